import { Agent, buildConnector } from 'undici';
import { CallbackHostRefused, type CallbackPolicy } from './callback-policy.js';

const CONNECT_TIMEOUT_MS = 5_000;

/**
 * The dispatcher callback deliveries go through. The policy sits in the connect path itself, so
 * the address checked is the address connected to (no separate pre-check a DNS answer could
 * change in between): a host the policy refuses (also an IP literal, which net.connect would
 * never resolve) fails before a socket exists, and a name connects only to the addresses its
 * lookup lets through.
 */
export function createCallbackAgent(policy: CallbackPolicy): Agent {
  const connect = buildConnector({ lookup: policy.lookup, timeout: CONNECT_TIMEOUT_MS });
  return new Agent({
    connect(options, callback) {
      const refusal = policy.refusal(options.hostname);
      if (refusal !== undefined) {
        callback(new CallbackHostRefused(refusal), null);
        return;
      }
      connect(options, callback);
    },
  });
}

/** The CallbackHostRefused behind a failed fetch (undici wraps it in `cause`), if that is why it failed. */
export function refusedBy(error: unknown): CallbackHostRefused | undefined {
  for (let current = error, depth = 0; current instanceof Error && depth < 5; current = current.cause, depth += 1) {
    if (current instanceof CallbackHostRefused) return current;
  }
  return undefined;
}
