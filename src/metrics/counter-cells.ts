import type { Attributes, ObservableResult } from '@opentelemetry/api';

/** Label sets one counter keeps before folding new ones into a single overflow series. */
export const MAX_SERIES = 2000;
export const OVERFLOW = '_overflow';
/** Joins a label set's values into its Map key. */
export const SEPARATOR = '\u0001';

/**
 * The cell of a label set that has none yet, for CounterCells and HistogramCells: made with
 * `create` and kept in `cells`. A client-chosen value (a model name the upstream echoes back) must
 * not grow memory or the scrape without bound: past MAX_SERIES, new label sets share one series
 * whose labels are all OVERFLOW.
 */
export function seriesCell<C>(cells: Map<string, C>, labels: readonly string[], values: readonly string[], create: (attributes: Attributes) => C): C {
  const folded = cells.size >= MAX_SERIES;
  const key = (folded ? labels.map(() => OVERFLOW) : values).join(SEPARATOR);
  let cell = cells.get(key);
  if (cell === undefined) {
    const attributes: Attributes = {};
    labels.forEach((label, i) => {
      attributes[label] = folded ? OVERFLOW : (values[i] ?? '');
    });
    cell = create(attributes);
    cells.set(key, cell);
  }
  return cell;
}

interface Cell {
  readonly attributes: Attributes;
  value: number;
}

/**
 * A cumulative counter held as plain numbers and handed to an OpenTelemetry observable counter
 * when Prometheus scrapes. A synchronous OTel `counter.add(1, attrs)` sorts and serialises the
 * attribute object on every call (measured ≈ 2 µs here, against ≈ 0.3 µs for this Map lookup); on
 * a request that costs ≈ 100 µs in total, four of them would be most of the metrics budget.
 *
 * Values are integers added as numbers: exact up to 2^53 (for cost in nano-dollars, ≈ $9M per
 * series per process lifetime).
 */
export class CounterCells {
  private readonly cells = new Map<string, Cell>();

  constructor(private readonly labels: readonly string[]) {}

  add(values: readonly string[], amount: number): void {
    (this.cells.get(values.join(SEPARATOR)) ?? seriesCell(this.cells, this.labels, values, newCounterCell)).value += amount;
  }

  /** Reports every series, each value divided by `scale` (nano-dollars → USD). */
  observe(result: ObservableResult, scale = 1): void {
    for (const cell of this.cells.values()) result.observe(scale === 1 ? cell.value : cell.value / scale, cell.attributes);
  }

  /** For tests: the current value of one label set. */
  valueOf(values: readonly string[]): number {
    return this.cells.get(values.join(SEPARATOR))?.value ?? 0;
  }
}

function newCounterCell(attributes: Attributes): Cell {
  return { attributes, value: 0 };
}
