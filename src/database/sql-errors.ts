/**
 * PostgreSQL refused the content (SQLSTATE class 22, data exception, or 23, integrity
 * constraint violation), not the connection: the same statement would fail again, so retrying it
 * only loops. Anything else (a dropped connection, a timeout, a server restarting) may work later.
 */
export function isDataError(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && (code.startsWith('22') || code.startsWith('23'));
}
