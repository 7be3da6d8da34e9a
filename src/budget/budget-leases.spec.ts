import { afterEach, describe, expect, it, vi } from 'vitest';
import { BudgetLeases, type Lease } from './budget-leases.js';

function leases(leaseMs = 1000) {
  let now = 0;
  const released: Lease[] = [];
  /** What retired leases still drawn on gave back of their rows: [lease id, nanos]. */
  const shrunk: Array<[string | undefined, bigint]> = [];
  const books = new BudgetLeases(
    leaseMs,
    4,
    (lease, nanos) => (nanos === undefined ? released.push(lease) : shrunk.push([lease.id, nanos])),
    () => now,
  );
  return {
    books,
    released,
    shrunk,
    advance: (ms: number) => {
      now += ms;
    },
  };
}

/** An ask that gets nothing (the database refused or could not be asked). */
const noLease = (): Promise<Lease | undefined> => Promise.resolve(undefined);

describe('BudgetLeases', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('draws within the lease size, counting what finished draws were charged, then asks for a new one', async () => {
    const { books, released } = leases();
    const lease = books.granted('l1', 'u', 'd', 100n, 30n);
    expect(await books.drawOrAsk('u', 'd', 30n, noLease)).toBe(lease);
    books.settle(lease, 30n, 25n); // charged 25, one draw of 30 still in flight
    expect(await books.drawOrAsk('u', 'd', 45n, noLease)).toBe(lease); // 25 + 30 + 45 = 100
    let asked = 0;
    // 25 + 75 = 100 already: nothing more fits, so the pair asks for a fresh lease (here refused).
    expect(
      await books.drawOrAsk('u', 'd', 1n, () => {
        asked += 1;
        books.refused('u', 'd');
        return Promise.resolve(undefined);
      }),
    ).toBeUndefined();
    expect(asked).toBe(1);
    // Retired but still drawn on: released only by its last draw.
    expect(released).toEqual([]);
    books.settle(lease, 30n, 30n);
    books.settle(lease, 45n, 40n);
    expect(released).toEqual([lease]);
    expect(lease.charged).toBe(95n);
  });

  it('makes requests that arrive while a lease is asked for wait for it and draw from it', async () => {
    const { books } = leases();
    let asks = 0;
    let grantIt: () => void = () => undefined;
    const ask = () => {
      asks += 1;
      return new Promise<Lease | undefined>((resolve) => {
        grantIt = () => resolve(books.granted('l1', 'u', 'd', 100n, 10n));
      });
    };
    const first = books.drawOrAsk('u', 'd', 10n, ask);
    const second = books.drawOrAsk('u', 'd', 10n, ask);
    const third = books.drawOrAsk('u', 'd', 95n, ask);
    grantIt();
    const lease = await first;
    expect(await second).toBe(lease);
    // 10 + 10 + 95 > 100: this one reserves exactly.
    expect(await third).toBeUndefined();
    expect(asks).toBe(1);
    expect(lease?.draws).toBe(2);
  });

  it('keeps a pair refused a lease on exact reservations until the lease period has passed', async () => {
    const { books, advance } = leases(1000);
    let asks = 0;
    const refuse = () => {
      asks += 1;
      books.refused('u', 'd');
      return Promise.resolve(undefined);
    };
    await books.drawOrAsk('u', 'd', 1n, refuse);
    await books.drawOrAsk('u', 'd', 1n, refuse);
    expect(asks).toBe(1);
    advance(1000);
    await books.drawOrAsk('u', 'd', 1n, refuse);
    expect(asks).toBe(2);
  });

  it('stops drawing on an expired lease and releases it once idle', async () => {
    const { books, released, advance } = leases(1000);
    const lease = books.granted('l1', 'u', 'd', 100n, 10n);
    books.settle(lease, 10n, 5n);
    advance(1000);
    expect(await books.drawOrAsk('u', 'd', 10n, noLease)).toBeUndefined();
    expect(released).toEqual([lease]);
  });

  it('gives back at once what a lease retired while drawn on does not need for its draws in flight', async () => {
    const { books, released, shrunk, advance } = leases(1000);
    const lease = books.granted('l1', 'u', 'd', 100n, 10n);
    expect(await books.drawOrAsk('u', 'd', 20n, noLease)).toBe(lease);
    books.settle(lease, 10n, 4n);
    // Expired with one draw of 20 in flight, 4 charged: 76 of the 100 are needed by nobody.
    advance(1000);
    expect(await books.drawOrAsk('u', 'd', 1n, noLease)).toBeUndefined();
    expect(shrunk).toEqual([['l1', 76n]]);
    expect(released).toEqual([]);
    // Once only: the views retiring everything again give nothing more back.
    books.retireAll();
    expect(shrunk).toEqual([['l1', 76n]]);
    books.settle(lease, 20n, 15n);
    expect(released).toEqual([lease]);
  });

  it('gives back what an expired lease still drawn on does not need when a reservation of its user or department is refused', () => {
    const { books, shrunk, advance } = leases(1000);
    books.granted('busy', 'u1', 'd', 100n, 10n);
    // Not expired: it keeps serving its pair.
    expect(books.releaseIdleFor('u2', 'd')).toBe(false);
    advance(1000);
    expect(books.releaseIdleFor('u2', 'd')).toBe(true);
    expect(shrunk).toEqual([['busy', 90n]]);
    expect(books.releaseIdleFor('u2', 'd')).toBe(false);
  });

  it('gives back only idle leases of the refused user or department, and everything at shutdown', () => {
    const { books, released, shrunk } = leases();
    const busy = books.granted('busy', 'u1', 'd', 100n, 10n);
    const idle = books.granted('idle', 'u2', 'd', 100n, 10n);
    books.settle(idle, 10n, 1n);
    const elsewhere = books.granted('other', 'u3', 'e', 100n, 10n);
    books.settle(elsewhere, 10n, 1n);
    expect(books.releaseIdleFor('u9', 'd')).toBe(true);
    expect(released).toEqual([idle]);
    expect(books.releaseIdleFor('u9', 'd')).toBe(false);
    books.close();
    expect(released).toEqual([idle, elsewhere]);
    expect(shrunk).toEqual([['busy', 90n]]);
    books.settle(busy, 10n, 2n);
    expect(released).toEqual([idle, elsewhere, busy]);
    expect(books.enabled).toBe(false);
  });

  it('gives an idle lease back as it expires, also one taken after another lease started the timer', () => {
    // Was: one setInterval(sweep, BUDGET_LEASE_MS) started by the first lease, so a lease taken
    // 100 ms later was swept only at the tick after it expired: held up to 2 × BUDGET_LEASE_MS.
    vi.useFakeTimers({ now: 0 });
    const released: Array<[string, number]> = [];
    const books = new BudgetLeases(
      2000,
      32,
      (lease, nanos) => nanos === undefined && released.push([lease.id, Date.now()]),
      () => Date.now(),
    );
    books.settle(books.granted('x', 'ux', 'dx', 32n, 1n), 1n, 1n);
    vi.advanceTimersByTime(100);
    books.settle(books.granted('y', 'uy', 'dy', 32n, 1n), 1n, 1n); // idle from here on; expires at t = 2100
    vi.advanceTimersByTime(2300 - 100);
    expect(released).toEqual([
      ['x', 2000],
      ['y', 2100],
    ]);
    // Nothing left to sweep: no timer keeps running.
    expect(vi.getTimerCount()).toBe(0);
    books.stop();
  });

  it('keeps no lease granted after shutdown began: it serves the request that asked, then goes back', () => {
    const { books, released, shrunk } = leases();
    books.close();
    const late = books.granted('late', 'u', 'd', 100n, 10n);
    expect(shrunk).toEqual([['late', 90n]]);
    books.settle(late, 10n, 3n);
    expect(released).toEqual([late]);
  });
});
