// privscore.v1.FeatureValue, the plaintext of every field (docs/envelope.md section 5.1),
// written and read by hand: a tag, then the value; a oneof member is written even when it
// holds its type's default. The same plaintext carries features, an account's state and an
// event's figures; amounts of money are a nested privscore.v1.Money (member 4).

import { concat, utf8 } from "./bytes.js";

/**
 * An amount of money: integer minor units of one currency (fen for CNY). `minor_units` is an
 * int64 on the wire: give a safe integer, a bigint or a decimal string; decoding gives a bigint.
 */
export interface MoneyInput {
  currency_code: string;
  minor_units: number | bigint | string;
}

/** A sealed value: numbers travel as doubles, categories as text, yes/no as booleans, amounts
 * as Money. */
export type FeatureInput = number | string | boolean | MoneyInput;
export type Features = Record<string, FeatureInput>;

const NUMBER_TAG = 0x09; // field 1, wire type 1 (64-bit)
const STRING_TAG = 0x12; // field 2, wire type 2 (length-delimited)
const BOOL_TAG = 0x18; // field 3, wire type 0 (varint)
const MONEY_TAG = 0x22; // field 4, wire type 2 (length-delimited): a privscore.v1.Money
const CURRENCY_TAG = 0x0a; // Money field 1, wire type 2
const MINOR_UNITS_TAG = 0x10; // Money field 2, wire type 0

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

function varint(n: number | bigint): Uint8Array {
  let rest = BigInt(n);
  if (rest < 0n) throw new RangeError("a varint is unsigned here");
  const out: number[] = [];
  do {
    let byte = Number(rest & 0x7fn);
    rest >>= 7n;
    if (rest > 0n) byte |= 0x80;
    out.push(byte);
  } while (rest > 0n);
  return Uint8Array.from(out);
}

/** `minor_units` as an int64, or a RangeError: never rounded, never wrapped. */
export function minorUnits(value: number | bigint | string): bigint {
  let n: bigint;
  if (typeof value === "bigint") n = value;
  else if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) {
      throw new RangeError("minor_units must be a safe integer, a bigint or a decimal string");
    }
    n = BigInt(value);
  } else if (typeof value === "string" && /^-?(0|[1-9][0-9]*)$/.test(value)) {
    n = BigInt(value);
  } else {
    throw new RangeError("minor_units must be an integer");
  }
  if (n < INT64_MIN || n > INT64_MAX) throw new RangeError("minor_units must fit an int64");
  return n;
}

function isMoney(value: unknown): value is MoneyInput {
  return (
    typeof value === "object" && value !== null && "currency_code" in value && "minor_units" in value
  );
}

/** A serialized privscore.v1.Money: proto3 leaves out a field at its default ("" and 0). */
export function encodeMoney(money: MoneyInput): Uint8Array {
  if (typeof money.currency_code !== "string") throw new TypeError("currency_code must be text");
  const units = minorUnits(money.minor_units);
  const parts: Uint8Array[] = [];
  if (money.currency_code !== "") {
    const code = utf8(money.currency_code);
    parts.push(Uint8Array.of(CURRENCY_TAG), varint(code.length), code);
  }
  if (units !== 0n) {
    // A negative int64 is its 64-bit two's complement: ten bytes of varint.
    parts.push(Uint8Array.of(MINOR_UNITS_TAG), varint(BigInt.asUintN(64, units)));
  }
  return concat(...parts);
}

export function encodeFeatureValue(value: FeatureInput): Uint8Array {
  if (typeof value === "boolean") return Uint8Array.of(BOOL_TAG, value ? 1 : 0);
  if (typeof value === "number") {
    const out = new Uint8Array(9);
    out[0] = NUMBER_TAG;
    new DataView(out.buffer).setFloat64(1, value, true);
    return out;
  }
  if (typeof value === "string") {
    const bytes = utf8(value);
    return concat(Uint8Array.of(STRING_TAG), varint(bytes.length), bytes);
  }
  if (isMoney(value)) {
    const body = encodeMoney(value);
    return concat(Uint8Array.of(MONEY_TAG), varint(body.length), body);
  }
  throw new TypeError(
    `sealed values are numbers, strings, booleans or Money, not ${
      value === null ? "null" : typeof value
    }`,
  );
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** Protobuf wire format, read field by field; null on anything malformed. */
class Reader {
  offset = 0;
  constructor(readonly bytes: Uint8Array) {}

  get done(): boolean {
    return this.offset >= this.bytes.length;
  }

  varint(): bigint | null {
    let result = 0n;
    for (let i = 0; i < 10; i++) {
      if (this.offset >= this.bytes.length) return null;
      const byte = this.bytes[this.offset++]!;
      result |= BigInt(byte & 0x7f) << BigInt(7 * i);
      if ((byte & 0x80) === 0) return BigInt.asUintN(64, result);
    }
    return null;
  }

  /** A length-delimited body, or null when it runs past the end. */
  delimited(): Uint8Array | null {
    const length = this.varint();
    if (length === null || BigInt(this.offset) + length > BigInt(this.bytes.length)) return null;
    const body = this.bytes.subarray(this.offset, this.offset + Number(length));
    this.offset += Number(length);
    return body;
  }

  fixed(size: 4 | 8): Uint8Array | null {
    if (this.offset + size > this.bytes.length) return null;
    const body = this.bytes.subarray(this.offset, this.offset + size);
    this.offset += size;
    return body;
  }

  /** Skip a field of this wire type; false when it cannot be skipped (groups, bad types). */
  skip(wireType: number): boolean {
    if (wireType === 0) return this.varint() !== null;
    if (wireType === 1) return this.fixed(8) !== null;
    if (wireType === 2) return this.delimited() !== null;
    if (wireType === 5) return this.fixed(4) !== null;
    return false;
  }

  /** The next key as (field number, wire type), or null. */
  key(): [number, number] | null {
    const key = this.varint();
    if (key === null || key >> 3n === 0n || key >> 3n > 0x1fffffffn) return null;
    return [Number(key >> 3n), Number(key & 7n)];
  }
}

function text(bytes: Uint8Array): string | null {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return null;
  }
}

/** Merge a serialized Money into `into` (protobuf merges a repeated embedded message). */
function mergeMoney(
  bytes: Uint8Array,
  into: { currency_code: string; minor_units: bigint },
): boolean {
  const reader = new Reader(bytes);
  while (!reader.done) {
    const key = reader.key();
    if (key === null) return false;
    const [field, wireType] = key;
    if (field === 1 && wireType === 2) {
      const body = reader.delimited();
      const code = body === null ? null : text(body);
      if (code === null) return false;
      into.currency_code = code;
    } else if (field === 2 && wireType === 0) {
      const n = reader.varint();
      if (n === null) return false;
      into.minor_units = BigInt.asIntN(64, n);
    } else if (!reader.skip(wireType)) {
      return false;
    }
  }
  return true;
}

/**
 * The typed value, or null when the bytes are no FeatureValue with a member set. Protobuf
 * rules: unknown fields are skipped, a later member replaces an earlier one, a repeated Money
 * merges into the one before. A Money decodes with `minor_units` as a bigint.
 */
export function decodeFeatureValue(bytes: Uint8Array): FeatureInput | null {
  const reader = new Reader(bytes);
  let value: FeatureInput | null = null;
  while (!reader.done) {
    const key = reader.key();
    if (key === null) return null;
    const [field, wireType] = key;
    if (field === 1 && wireType === 1) {
      const body = reader.fixed(8);
      if (body === null) return null;
      value = new DataView(body.buffer, body.byteOffset, 8).getFloat64(0, true);
    } else if (field === 2 && wireType === 2) {
      const body = reader.delimited();
      const decoded = body === null ? null : text(body);
      if (decoded === null) return null;
      value = decoded;
    } else if (field === 3 && wireType === 0) {
      const n = reader.varint();
      if (n === null) return null;
      value = n !== 0n;
    } else if (field === 4 && wireType === 2) {
      const body = reader.delimited();
      if (body === null) return null;
      const money: { currency_code: string; minor_units: bigint } =
        isMoney(value) && typeof value.minor_units === "bigint"
          ? { currency_code: value.currency_code, minor_units: value.minor_units }
          : { currency_code: "", minor_units: 0n };
      if (!mergeMoney(body, money)) return null;
      value = money;
    } else if (!reader.skip(wireType)) {
      return null; // a known field with the wrong wire type, a group, a reserved wire type
    }
  }
  return value;
}
