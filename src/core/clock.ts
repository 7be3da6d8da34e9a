/** Time as a dependency, so budget periods and TTLs are testable with a controllable clock. */
export abstract class Clock {
  abstract now(): Date;
  abstract nowMs(): number;
}

export class SystemClock extends Clock {
  now(): Date {
    return new Date();
  }
  nowMs(): number {
    return Date.now();
  }
}

export class ManualClock extends Clock {
  constructor(private ms: number = Date.parse('2026-01-05T12:00:00Z')) {
    super();
  }
  now(): Date {
    return new Date(this.ms);
  }
  nowMs(): number {
    return this.ms;
  }
  set(iso: string): void {
    this.ms = Date.parse(iso);
  }
  advance(ms: number): void {
    this.ms += ms;
  }
}
