import { ApiProperty } from '@nestjs/swagger';
import { GatewayError } from '../../../core/errors.js';
import { asBody } from '../../../core/validate.js';
import type { ModelPrice } from '../pricing.js';
import type { PriceEntry } from '../pricing.service.js';

const NUMBER_TEXT = /^(\d+)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/;
const MAX_PRICE_DIGITS = 30;

/**
 * A per-token USD price as exact decimal text, like OpenRouter's: "0.00000015". JSON numbers are
 * accepted too and expanded from their shortest text (1.5e-7 → "0.00000015"), never through float
 * arithmetic. Undefined for anything negative, non-numeric or absurdly precise.
 */
export function plainDecimal(value: unknown): string | undefined {
  let text: string;
  if (typeof value === 'number') {
    if (!Number.isFinite(value) || value < 0) return undefined;
    text = String(value);
  } else if (typeof value === 'string') {
    text = value.trim();
  } else {
    return undefined;
  }
  const m = NUMBER_TEXT.exec(text);
  if (!m) return undefined;
  const intPart = m[1] ?? '0';
  const fracPart = m[2] ?? '';
  const exponent = m[3] ? Number(m[3]) : 0;
  let digits = intPart + fracPart;
  let point = intPart.length + exponent;
  if (point < 0) {
    digits = '0'.repeat(-point) + digits;
    point = 0;
  }
  if (point > digits.length) digits += '0'.repeat(point - digits.length);
  const whole = digits.slice(0, point).replace(/^0+(?=\d)/, '') || '0';
  const frac = digits.slice(point).replace(/0+$/, '');
  if (whole.length + frac.length > MAX_PRICE_DIGITS) return undefined;
  return frac ? `${whole}.${frac}` : whole;
}

function priceField(body: Record<string, unknown>, param: 'prompt' | 'completion'): string {
  const v = body[param];
  if (v === undefined || v === null) throw new GatewayError('missing_field', `Missing required parameter: '${param}'.`, { param });
  const text = plainDecimal(v);
  if (text === undefined) {
    throw new GatewayError('invalid_value', `'${param}' must be a non-negative USD price per token, e.g. "0.00000015".`, { param });
  }
  return text;
}

export class PutPriceDto {
  @ApiProperty({ example: '0.00000015', description: 'USD per prompt token (decimal string or number)' }) prompt!: string;
  @ApiProperty({ example: '0.0000006', description: 'USD per completion token (decimal string or number)' }) completion!: string;
  static parse(raw: unknown): ModelPrice {
    const body = asBody(raw);
    return { prompt: priceField(body, 'prompt'), completion: priceField(body, 'completion') };
  }
}

export const priceView = (p: PriceEntry) => ({
  model: p.model,
  prompt: p.prompt,
  completion: p.completion,
  source: p.source,
  updated_at: p.updatedAt ?? null,
  updated_by: p.updatedBy ?? null,
});
