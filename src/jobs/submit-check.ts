import { Injectable } from '@nestjs/common';
import { BudgetService } from '../budget/budget.service.js';
import { CompletionService } from '../completion/completion.service.js';
import type { CompletionCall } from '../completion/completion.types.js';
import type { NewJob } from './job.types.js';

/** Nothing at submit waits on the call's signal: routing and the budget read are not the call. */
const NOT_CANCELLED = new AbortController().signal;

/**
 * What a sync call would be refused for before it reaches the upstream, answered to an async
 * submit as the sync call gets it, instead of a 202 for a job that could only fail on its first
 * try: the route (a model the routing table does not allow, a task type it does not know: the
 * same 4xx and `param`) and API.md's 402 (`budget_exceeded`, `param` naming the scope) when the
 * user's or department's budget cannot cover the route's worst case now. Read-only: nothing is
 * reserved or charged; the job's try routes and reserves again when it runs, as any call does, so
 * a routing table changed in between still decides (and fails the job, audited, if it refuses).
 */
@Injectable()
export class SubmitCheck {
  constructor(
    private readonly completions: CompletionService,
    private readonly budget: BudgetService,
  ) {}

  async assertRunnable(job: NewJob): Promise<void> {
    const call: CompletionCall = {
      principal: job.principal,
      requestId: job.requestId,
      body: job.body,
      taskType: job.taskType,
      door: 'job',
      signal: NOT_CANCELLED,
      cacheControl: job.cacheControl,
    };
    // The worst case is the run's: the route it will take (its models' prices, its token cap).
    const route = this.completions.resolve(call);
    await this.budget.assertAffordable(call, route);
  }
}
