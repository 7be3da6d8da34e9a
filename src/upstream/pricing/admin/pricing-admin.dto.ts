import { ApiProperty } from '@nestjs/swagger';
import { GatewayError } from '../../../core/errors.js';
import { asBody, rejectUnknownFields } from '../../../core/validate.js';
import type { ModelPrice } from '../pricing.js';
import type { PriceEntry } from '../pricing.service.js';

const NUMBER_TEXT = /^(\d+)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/;
const MAX_PRICE_DIGITS = 30;
/**
 * USD per token: a million times the dearest model's price, and low enough that a request of a
 * few million tokens still costs less than a bigint of nano-dollars holds.
 */
export const MAX_PRICE_USD = 1000;

/**
 * A per-token USD price as exact decimal text, like OpenRouter's: "0.00000015". JSON numbers are
 * accepted too and expanded from their shortest text (1.5e-7 → "0.00000015"), never through float
 * arithmetic. Undefined for anything negative, non-numeric, absurdly precise (more than
 * MAX_PRICE_DIGITS digits written out) or above MAX_PRICE_USD. The digits are counted before
 * any are written out, so an exponent such as 1e999999999 costs nothing.
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
  const all = intPart + (m[2] ?? '');
  // Significant digits only: leading zeros move the point, trailing ones say nothing.
  const digits = all.replace(/^0+/, '').replace(/0+$/, '');
  if (digits === '') return '0';
  // Where the decimal point falls within `digits` (a long exponent makes it ±Infinity).
  const point = intPart.length - (all.length - all.replace(/^0+/, '').length) + (m[3] ? Number(m[3]) : 0);
  // Digits written out: the whole part ("0" when there is none) and the fraction.
  const written = point >= digits.length ? point : point > 0 ? digits.length : 1 + digits.length - point;
  if (written > MAX_PRICE_DIGITS) return undefined;
  // At most MAX_PRICE_USD (1000): four whole digits only for 1000 itself.
  if (point > 4 || (point === 4 && digits !== '1')) return undefined;
  if (point >= digits.length) return digits + '0'.repeat(point - digits.length);
  if (point > 0) return `${digits.slice(0, point)}.${digits.slice(point)}`;
  return `0.${'0'.repeat(-point)}${digits}`;
}

function priceField(body: Record<string, unknown>, param: 'prompt' | 'completion'): string {
  const v = body[param];
  if (v === undefined || v === null) throw new GatewayError('missing_field', `Missing required parameter: '${param}'.`, { param });
  const text = plainDecimal(v);
  if (text === undefined) {
    throw new GatewayError(
      'invalid_value',
      `'${param}' must be a non-negative USD price per token of at most ${MAX_PRICE_USD} and ${MAX_PRICE_DIGITS} digits, e.g. "0.00000015".`,
      { param },
    );
  }
  return text;
}

export class PutPriceDto {
  @ApiProperty({ example: '0.00000015', description: 'USD per prompt token (decimal string or number)' }) prompt!: string;
  @ApiProperty({ example: '0.0000006', description: 'USD per completion token (decimal string or number)' }) completion!: string;
  static parse(raw: unknown): ModelPrice {
    const body = asBody(raw);
    rejectUnknownFields(body, ['prompt', 'completion']);
    return { prompt: priceField(body, 'prompt'), completion: priceField(body, 'completion') };
  }
}

export const priceView = (p: PriceEntry) => ({
  model: p.model,
  prompt: p.prompt,
  completion: p.completion,
  // USD per input image and per request, as published (null when the model charges none): the
  // budget's worst case reads them.
  image: p.image ?? null,
  request: p.request ?? null,
  source: p.source,
  updated_at: p.updatedAt ?? null,
  updated_by: p.updatedBy ?? null,
});
