import { GatewayError } from '../core/errors.js';
import { queryDate } from '../core/validate.js';
import { SPEND_GROUPS, type SpendGroup, type SpendWindow } from './spend.service.js';

// Query-string parsing for the spend reports (admin and /v1/usage), naming the bad field.

export function parseSpendGroup(value: string | undefined): SpendGroup {
  if (value === undefined || value === '') return 'user';
  if (!(SPEND_GROUPS as readonly string[]).includes(value)) {
    throw new GatewayError('invalid_value', `'group_by' must be one of ${SPEND_GROUPS.join(', ')}.`, { param: 'group_by' });
  }
  return value as SpendGroup;
}

export function parseSpendWindow(from: string | undefined, to: string | undefined): SpendWindow {
  return { from: queryDate(from, 'from'), to: queryDate(to, 'to') };
}
