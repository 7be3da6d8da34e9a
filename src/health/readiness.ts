import { Injectable } from '@nestjs/common';

export type ReadinessState = 'up' | 'degraded' | 'down';
export interface ReadinessReport {
  state: ReadinessState;
  details?: Record<string, unknown>;
}

/**
 * Features register their dependency checks here (database, Redis, queue) so /health/ready
 * names each one without the health module knowing any feature.
 */
@Injectable()
export class ReadinessRegistry {
  readonly checks = new Map<string, () => Promise<ReadinessReport>>();

  register(name: string, check: () => Promise<ReadinessReport>): void {
    if (this.checks.has(name)) throw new Error(`readiness check '${name}' registered twice`);
    this.checks.set(name, check);
  }
}
