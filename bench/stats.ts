/**
 * Small statistics helpers for the benchmark. Latencies are kept as plain millisecond arrays:
 * a run records at most a few hundred thousand of them, so sorting once per summary is cheaper
 * and more exact than a histogram.
 */

/**
 * Nearest-rank percentile of an already sorted (ascending) array: the smallest value such that
 * at least `p` percent of the samples are at or below it. `NaN` for an empty array.
 */
export function percentileSorted(sorted: ArrayLike<number>, p: number): number {
  if (!(p >= 0 && p <= 100)) throw new RangeError(`percentile must be within 0..100, got ${p}`);
  const n = sorted.length;
  if (n === 0) return Number.NaN;
  const rank = Math.ceil((p / 100) * n);
  return sorted[Math.min(n - 1, Math.max(0, rank - 1))];
}

export interface LatencySummary {
  count: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

/** Summarises samples without modifying the caller's array. */
export function summarize(samples: ArrayLike<number>): LatencySummary {
  const sorted = Float64Array.from(samples).sort();
  const n = sorted.length;
  let sum = 0;
  for (let i = 0; i < n; i++) sum += sorted[i];
  return {
    count: n,
    mean: n === 0 ? Number.NaN : sum / n,
    p50: percentileSorted(sorted, 50),
    p90: percentileSorted(sorted, 90),
    p99: percentileSorted(sorted, 99),
    max: n === 0 ? Number.NaN : sorted[n - 1],
  };
}

/** Concatenates sample arrays from several rounds so percentiles are taken over all of them. */
export function pool(parts: ReadonlyArray<ArrayLike<number>>): Float64Array {
  let total = 0;
  for (const part of parts) total += part.length;
  const out = new Float64Array(total);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** a ÷ b, or NaN when either side is missing or b is zero (shown as "n/a" in reports). */
export function ratio(a: number | undefined, b: number | undefined): number {
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0) return Number.NaN;
  return a / b;
}

/** Median of a few numbers (per-round ratios); NaN when empty. */
export function median(values: readonly number[]): number {
  const finite = values.filter((v) => Number.isFinite(v)).sort((x, y) => x - y);
  if (finite.length === 0) return Number.NaN;
  const mid = finite.length >> 1;
  return finite.length % 2 === 1 ? finite[mid] : (finite[mid - 1] + finite[mid]) / 2;
}

/**
 * Two-sided exact sign test: the chance that `n` fair coin tosses split at least as unevenly as
 * `k` against `n − k`. Read beside a paired comparison: with each round a toss of which build was
 * cheaper, a small value says the direction is not the noise of a few rounds. With 6 rounds even
 * 6 of 6 gives 0.031, and 5 of 6 0.22: a quick run rarely decides a change of a few per cent.
 * 1 when `n` is 0.
 */
export function signTestP(k: number, n: number): number {
  if (!Number.isInteger(k) || !Number.isInteger(n) || k < 0 || n < 0 || k > n) throw new RangeError(`signTestP: need 0 <= k <= n, got k=${k}, n=${n}`);
  const tail = Math.min(k, n - k);
  let coefficient = 1;
  let sum = 0;
  for (let i = 0; i <= tail; i++) {
    sum += coefficient;
    coefficient = (coefficient * (n - i)) / (i + 1);
  }
  return Math.min(1, (2 * sum) / 2 ** n);
}
