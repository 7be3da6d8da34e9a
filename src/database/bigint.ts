import type { ValueTransformer } from 'typeorm';

/** bigint columns arrive as strings from pg; money and counters are BigInt in code. */
export const bigintTransformer: ValueTransformer = {
  to: (value: bigint | null | undefined) => (value === null || value === undefined ? value : value.toString()),
  from: (value: string | null) => (value === null ? null : BigInt(value)),
};
