import { Injectable } from '@nestjs/common';
import { BudgetService } from '../budget/budget.service.js';
import { CompletionService } from '../completion/completion.service.js';
import type { CompletionCall } from '../completion/completion.types.js';
import { isGatewayError } from '../core/errors.js';
import type { ResolvedRoute } from '../routing/routing-table.js';
import type { NewJob } from './job.types.js';

/** Nothing at submit waits on the call's signal: routing and the budget read are not the call. */
const NOT_CANCELLED = new AbortController().signal;

/**
 * API.md's 402 (`budget_exceeded`, `param` naming the scope) for an async submit, as a sync call
 * gets it: a job its user's or department's budget cannot cover now is refused at the door,
 * instead of being accepted (202) only to fail on its first try. Read-only: nothing is reserved
 * or charged here; the job's try reserves when it runs, as any call does.
 */
@Injectable()
export class SubmitBudgetCheck {
  constructor(
    private readonly completions: CompletionService,
    private readonly budget: BudgetService,
  ) {}

  async assertAffordable(job: NewJob): Promise<void> {
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
    let route: ResolvedRoute;
    try {
      route = this.completions.resolve(call);
    } catch (error) {
      // A request routing refuses (a model not allowed, …) fails its job for that reason, as
      // before: said on its first try, not turned into a budget answer here.
      if (isGatewayError(error)) return;
      throw error;
    }
    await this.budget.assertAffordable(call, route);
  }
}
