import { Controller, Get, HttpException, Res } from '@nestjs/common';
import { ApiTags } from '@nestjs/swagger';
import { HealthCheckService, HealthIndicatorService, type HealthIndicatorResult } from '@nestjs/terminus';
import type { FastifyReply } from 'fastify';
import { Database } from '../database/database.module.js';
import { UpstreamInfo } from '../upstream/llm-client.js';
import { ReadinessRegistry } from './readiness.js';

const CHECK_TIMEOUT_MS = 2000;

/**
 * One round trip: the server answers, and would take a write. Both functions are PostgreSQL's
 * own and answer on PGlite too (never in recovery, read-write).
 */
const DATABASE_STATE_SQL = `SELECT pg_is_in_recovery() AS in_recovery, current_setting('transaction_read_only') AS read_only`;

interface DatabaseState {
  in_recovery: boolean;
  read_only: string;
}

/**
 * Kubernetes probes in the terminus format. Liveness checks nothing shared (a database outage
 * must not restart every pod); readiness checks what serving needs and never calls a model.
 */
@ApiTags('operations')
@Controller('health')
export class HealthController {
  constructor(
    private readonly health: HealthCheckService,
    private readonly indicators: HealthIndicatorService,
    private readonly database: Database,
    private readonly upstream: UpstreamInfo,
    private readonly registry: ReadinessRegistry,
  ) {}

  /**
   * Answered without terminus: terminus marks every check "shutting down" once Nest's shutdown
   * hooks start, and a draining pod is still alive (a failing liveness probe would have it killed
   * mid-drain). The body keeps terminus's shape.
   */
  @Get('live')
  live() {
    return { status: 'ok', info: {}, error: {}, details: {} };
  }

  @Get('ready')
  async ready(@Res() reply: FastifyReply): Promise<void> {
    await this.respond(reply, () =>
      this.health.check([
        () =>
          this.indicators
            .check('database')
            .attempt(async ({ signal }) => {
              const rows = await Promise.race([this.database.dataSource.query<DatabaseState[]>(DATABASE_STATE_SQL), aborted(signal)]);
              // A server that answers reads but refuses writes (a demoted primary back as a standby,
              // DATABASE_URL on a replica) serves no completion: each one's budget reservation is a
              // write. Not ready, so the load balancer stops sending it traffic.
              const refusal = writeRefusal(rows[0]);
              if (refusal !== undefined) throw new Error(refusal);
              return { driver: this.database.kind };
            })
            .withTimeout(CHECK_TIMEOUT_MS),
        () => this.indicators.check('upstream').up({ mode: this.upstream.mock ? 'mock' : 'live', calls_model: false }),
        ...[...this.registry.checks].map(([name, check]) => async (): Promise<HealthIndicatorResult> => {
          const session = this.indicators.check(name);
          try {
            const report = await check();
            return report.state === 'up' ? session.up(report.details ?? {}) : report.state === 'degraded' ? session.degraded(report.details ?? {}) : session.down(report.details ?? {});
          } catch (error) {
            return session.down({ message: (error as Error).message });
          }
        }),
      ]),
    );
  }

  private async respond(reply: FastifyReply, run: () => Promise<unknown>): Promise<void> {
    try {
      await reply.status(200).send(await run());
    } catch (error) {
      // Terminus signals "not ready" by throwing 503 with its report; keep its format (not the
      // OpenAI envelope) because probes and dashboards read it.
      if (error instanceof HttpException) await reply.status(error.getStatus()).send(error.getResponse());
      else throw error;
    }
  }
}

/** Why the database cannot take the gateway's writes, or undefined when it can. */
function writeRefusal(state: DatabaseState | undefined): string | undefined {
  if (state === undefined) return 'the database answered the readiness query with no row';
  if (state.in_recovery === true) return 'the database is a standby (in recovery): it refuses writes';
  if (state.read_only !== 'off') return `the database refuses writes (transaction_read_only = ${state.read_only})`;
  return undefined;
}

function aborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => signal.addEventListener('abort', () => reject(new Error('timed out')), { once: true }));
}
