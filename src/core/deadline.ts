/**
 * Rejects with `error()` when `promise` has not settled within `ms`. The work itself goes on (a
 * query stays on its connection until the driver's own timeout frees it): what this bounds is
 * how long a caller waits, e.g. a request on a database that has stopped answering.
 */
export function withTimeout<T>(promise: Promise<T>, ms: number, error: () => Error = () => new Error(`no answer within ${ms} ms`)): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(error()), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * One database statement (or wait) on a request's path, bounded by DATABASE_REQUEST_TIMEOUT_MS:
 * past `ms` it rejects with `unavailable(cause)` (a 503 for the caller), `onTimeout` first undoing
 * what the statement may still do once it lands. Its other failures pass through as they are.
 */
export function databaseStep<T>(work: Promise<T>, ms: number, unavailable: (cause: Error) => Error, onTimeout?: () => void): Promise<T> {
  return withTimeout(work, ms, () => {
    onTimeout?.();
    return unavailable(new Error(`the database did not answer within ${ms} ms`));
  });
}
