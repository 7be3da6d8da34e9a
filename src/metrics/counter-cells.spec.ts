import type { Attributes, ObservableResult } from '@opentelemetry/api';
import { describe, expect, it } from 'vitest';
import { CounterCells, MAX_SERIES, OVERFLOW } from './counter-cells.js';

function collect(cells: CounterCells, scale?: number): Array<[number, Attributes]> {
  const seen: Array<[number, Attributes]> = [];
  const result: ObservableResult = { observe: (value, attributes) => seen.push([value, attributes ?? {}]) };
  cells.observe(result, scale);
  return seen;
}

describe('CounterCells', () => {
  it('sums per label set and reports each set with its labels', () => {
    const cells = new CounterCells(['model', 'type']);
    cells.add(['a', 'prompt'], 3);
    cells.add(['a', 'prompt'], 4);
    cells.add(['b', 'completion'], 1);
    expect(collect(cells)).toEqual([
      [7, { model: 'a', type: 'prompt' }],
      [1, { model: 'b', type: 'completion' }],
    ]);
  });

  it('keeps integer nano-dollars exact and reports them scaled to USD', () => {
    const cells = new CounterCells(['model']);
    for (let n = 0; n < 1000; n++) cells.add(['m'], 123);
    expect(cells.valueOf(['m'])).toBe(123_000);
    expect(collect(cells, 1e9)).toEqual([[0.000123, { model: 'm' }]]);
  });

  it('folds label sets beyond the cap into one overflow series instead of growing without bound', () => {
    const cells = new CounterCells(['model']);
    for (let n = 0; n < MAX_SERIES + 50; n++) cells.add([`model-${n}`], 1);
    const seen = collect(cells);
    expect(seen).toHaveLength(MAX_SERIES + 1);
    expect(seen.at(-1)).toEqual([50, { model: OVERFLOW }]);
  });
});
