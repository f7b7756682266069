// The committed test vectors (protos/privscore/v1/testvectors/), typed.

import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";

import { fromHex, packageRoot, type EncryptedFeaturesMessage, type FeatureInput } from "../src/index.js";

export const VECTORS_DIR = resolve(packageRoot(), "..", "..", "protos", "privscore", "v1", "testvectors");

/** A typed value as the vectors write it; a Money in the protobuf JSON mapping (int64 minor
 * units as a decimal string). */
export type TypedValue =
  | { number_value: number }
  | { string_value: string }
  | { bool_value: boolean }
  | { money_value: { currency_code: string; minor_units: string } };

export interface FieldJson {
  name: string;
  key_id: string;
  nonce: string;
  ciphertext: string;
}
export interface FeaturesJson {
  schema_version: string;
  data_key: { key_id: string; encapsulated_key: string; sealed_key: string };
  fields: FieldJson[];
}
export interface SubjectJson {
  tenant: string;
  pseudonym: string;
}
export interface PositiveCase {
  name: string;
  method: string;
  identity: string;
  now_ms: number;
  batch: boolean;
  data_key: {
    key_id: string;
    grant: { data_key: string; made_at_ms: number; max_age_ms: number; max_requests: number; max_bytes: number };
    grant_plaintext: string;
    info: string;
    ikm_e: string;
    ephemeral_private_key: string;
    encapsulated_key: string;
    sealed_key: string;
  };
  messages: Array<{
    request_id: string;
    subject: SubjectJson;
    /** Where the envelope travels in its request: features, sealed_account, event.sealed_figures. */
    path?: string;
    schema_version: string;
    fields: Array<{ name: string; value: TypedValue; plaintext: string; nonce: string; aad: string; ciphertext: string }>;
    features: FeaturesJson;
    opened: Record<string, TypedValue>;
  }>;
}
export interface NegativeCase {
  name: string;
  description: string;
  context: { method: string; identity: string; request_id: string; subject: SubjectJson; now_ms: number; path?: string };
  features: FeaturesJson;
  expect: { code: string; reason: string; violations: Array<{ field: string; reason: string }> };
}
export interface Envelope {
  format: number;
  labels: { info: string; field_aad: string };
  server_key: { key_id: string; ikm_r: string; private_key: string; public_key: string };
  keyring: { retired_key_ids: string[]; served_schema_version: string };
  cases: PositiveCase[];
  negative: NegativeCase[];
}
export interface Pseudonyms {
  label: string;
  cases: Array<{ name: string; key: string; tenant: string; customer_id: string; message: string; pseudonym: string }>;
  invalid: Array<{ name: string; key: string; tenant: string; customer_id: string }>;
}

export const envelope = JSON.parse(readFileSync(join(VECTORS_DIR, "envelope-v2.json"), "utf8")) as Envelope;
export const pseudonyms = JSON.parse(readFileSync(join(VECTORS_DIR, "pseudonym.json"), "utf8")) as Pseudonyms;

/** The value as the client takes it, and as decodeFeatureValue gives it back (a Money's
 * minor units as a bigint). */
export function typed(value: TypedValue): FeatureInput {
  if ("number_value" in value) return value.number_value;
  if ("string_value" in value) return value.string_value;
  if ("money_value" in value) {
    const { currency_code, minor_units } = value.money_value;
    return { currency_code, minor_units: BigInt(minor_units) };
  }
  return value.bool_value;
}

export function featuresMessage(json: FeaturesJson): EncryptedFeaturesMessage {
  return {
    schema_version: json.schema_version,
    data_key: {
      key_id: json.data_key.key_id,
      encapsulated_key: fromHex(json.data_key.encapsulated_key),
      sealed_key: fromHex(json.data_key.sealed_key),
    },
    fields: json.fields.map((f) => ({
      name: f.name,
      key_id: f.key_id,
      nonce: fromHex(f.nonce),
      ciphertext: fromHex(f.ciphertext),
    })),
  };
}
