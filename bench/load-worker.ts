/**
 * Child-process entry of the load generator (forked by LoadWorker): receives LoadSpecs over IPC,
 * runs them one at a time, sends the results back. It exits when the parent disconnects.
 */
import { type LoadResult, type LoadSpec, runLoad } from './load.js';

export interface LoadRequestMessage {
  id: number;
  spec: LoadSpec;
}

export type LoadReplyMessage = { id: number; result: LoadResult } | { id: number; error: string };

function isRequest(message: unknown): message is LoadRequestMessage {
  return (
    typeof message === 'object' &&
    message !== null &&
    typeof (message as { id?: unknown }).id === 'number' &&
    typeof (message as { spec?: unknown }).spec === 'object'
  );
}

process.on('message', (message: unknown) => {
  if (!isRequest(message)) return;
  runLoad(message.spec).then(
    (result) => process.send?.({ id: message.id, result } satisfies LoadReplyMessage),
    (error: unknown) =>
      process.send?.({ id: message.id, error: error instanceof Error ? (error.stack ?? error.message) : String(error) } satisfies LoadReplyMessage),
  );
});
process.on('disconnect', () => process.exit(0));
