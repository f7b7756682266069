// privscore.v1.FeatureValue, the plaintext of every field (docs/envelope.md section 5.1),
// written and read by hand: a tag, then the value; a oneof member is written even when it
// holds its type's default.

import { concat, utf8 } from "./bytes.js";

/** A feature value: numbers travel as doubles, categories as text, yes/no as booleans. */
export type FeatureInput = number | string | boolean;
export type Features = Record<string, FeatureInput>;

const NUMBER_TAG = 0x09; // field 1, wire type 1 (64-bit)
const STRING_TAG = 0x12; // field 2, wire type 2 (length-delimited)
const BOOL_TAG = 0x18; // field 3, wire type 0 (varint)

function varint(n: number): Uint8Array {
  const out: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    out.push(byte);
  } while (n > 0);
  return Uint8Array.from(out);
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
  throw new TypeError(`feature values are numbers, strings or booleans, not ${typeof value}`);
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * The typed value, or null when the bytes are no FeatureValue with a member set. Protobuf
 * rules: unknown fields are skipped, a later member replaces an earlier one.
 */
export function decodeFeatureValue(bytes: Uint8Array): FeatureInput | null {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let offset = 0;
  let value: FeatureInput | null = null;
  const readVarint = (): number | null => {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (offset >= bytes.length) return null;
      const byte = bytes[offset++]!;
      result += (byte & 0x7f) * scale;
      scale *= 128;
      if ((byte & 0x80) === 0) return result;
    }
    return null;
  };
  while (offset < bytes.length) {
    const key = readVarint();
    if (key === null) return null;
    const field = Math.floor(key / 8);
    const wireType = key % 8;
    if (field === 0) return null;
    if (wireType === 0) {
      const n = readVarint();
      if (n === null) return null;
      if (field === 3) value = n !== 0;
    } else if (wireType === 1) {
      if (offset + 8 > bytes.length) return null;
      if (field === 1) value = view.getFloat64(offset, true);
      offset += 8;
    } else if (wireType === 2) {
      const length = readVarint();
      if (length === null || offset + length > bytes.length) return null;
      const body = bytes.subarray(offset, offset + length);
      offset += length;
      if (field === 2) {
        try {
          value = strictUtf8.decode(body);
        } catch {
          return null;
        }
      }
    } else if (wireType === 5) {
      if (offset + 4 > bytes.length) return null;
      offset += 4;
    } else {
      return null; // groups and reserved wire types
    }
  }
  return value;
}
