import type { FastifyRequest } from 'fastify';

/**
 * `prefer: respond-async` (RFC 7240), among other preferences and in any case: the completion
 * doors turn such a request into a job, and the audit hook watches it as a change. Its absence
 * costs one property read.
 */
export function wantsAsync(request: FastifyRequest): boolean {
  const prefer = request.headers.prefer;
  if (prefer === undefined) return false;
  return (Array.isArray(prefer) ? prefer : [prefer]).some((value) =>
    value.split(',').some((preference) => (preference.split(';')[0] ?? '').trim().toLowerCase() === 'respond-async'),
  );
}
