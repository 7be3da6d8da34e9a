/**
 * A request target in origin form (`/admin/keys?x=1`). HTTP/1.1 servers must also accept the
 * absolute form (`http://host/admin/keys`, RFC 9112 §3.2.2), which forward proxies send. Fastify's
 * router strips the scheme and authority itself, but everything else that reads `request.url`
 * (the audit hook's test for /admin and /v1, the access log, the trace's path) saw the absolute
 * form: an admin change, or a failed admin login, made that way left no audit row. Given to
 * Fastify as `rewriteUrl`, so every reader sees the origin form. The common request costs one
 * character test.
 */
export function originForm(url: string): string {
  if (url.charCodeAt(0) === 47 /* / */) return url;
  const absolute = ABSOLUTE.exec(url);
  if (absolute === null) return url;
  const rest = url.slice(absolute[0].length);
  return rest.charCodeAt(0) === 47 ? rest : `/${rest}`;
}

/** `scheme://authority`, as RFC 3986 spells a scheme; the authority runs to the path, query or fragment. */
const ABSOLUTE = /^[A-Za-z][A-Za-z0-9+.-]*:\/\/[^/?#]*/;
