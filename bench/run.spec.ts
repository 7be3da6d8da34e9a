import { describe, expect, it } from 'vitest';
import { parseOptions, roundTripCases } from './run.js';

describe('--variant', () => {
  it('starts each saved build under its own name', () => {
    const options = parseOptions(['--variant', 'before=/tmp/a', '--variant', 'after=/tmp/b']);
    expect(options.variants).toEqual([
      { name: 'before', dist: '/tmp/a' },
      { name: 'after', dist: '/tmp/b' },
    ]);
  });

  // The report pools runs by target name: a variant named like another target would be averaged into it.
  it.each(['direct', 'floor', 'parse floor', 'gateway', 'gateway/semi16', 'embedded'])('refuses the name %s, which another target has', (name) => {
    expect(() => parseOptions(['--variant', `${name}=/tmp/a`])).toThrow(/--variant: the name .* is taken/);
  });

  it('refuses the same name twice', () => {
    expect(() => parseOptions(['--variant', 'before=/tmp/a', '--variant', 'before=/tmp/b'])).toThrow(/--variant: the name "before" is given twice/);
  });
});

describe('round-trip cases', () => {
  it('counts cache hits only for targets that have a cache', () => {
    const options = parseOptions(['--kinds', 'json', '--cache', 'miss,hit']);
    expect(roundTripCases(options, 'gateway').map((c) => c.cache)).toEqual(['miss', 'hit']);
    expect(roundTripCases(options, 'floor').map((c) => c.cache)).toEqual(['miss']);
    expect(roundTripCases(options, 'parse floor').map((c) => c.cache)).toEqual(['miss']);
  });
});
