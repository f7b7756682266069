// The server's side of sealing format 2, written from docs/envelope.md section 7 (stages 1-9)
// for one envelope of one request (features, an account's state or an event's figures): what a server must accept and refuse, with the stated code, reason and
// field violations. privscore's server is the Python one; this exists so that the test vectors'
// negative cases can be checked in this language too. It keeps no cache, so it counts a key's
// requests and bytes for this request alone.

import { HPKE_SUITE, CEILING_KEY_LIMITS, CLOCK_SKEW_MS, ENCAPSULATED_KEY_BYTES, GRANT_BYTES,
  NONCE_BYTES, SEALED_KEY_BYTES, TAG_BYTES, decodeGrant, decryptField, fieldAad, hpkeInfo,
  type EncryptedFeaturesMessage, type Grant, type Subject } from "./sealing.js";
import { decodeFeatureValue, type Features } from "./featureValue.js";
import { own } from "./bytes.js";
import { ACCOUNT_SCHEMA_VERSION, EVENT_SCHEMA_VERSION } from "./figures.js";

export interface Violation {
  field: string;
  reason: string;
  description: string;
}

/** A refusal as the server states it: gRPC code name, ErrorInfo reason, field violations. */
export class EnvelopeError extends Error {
  constructor(
    readonly code: "INVALID_ARGUMENT" | "FAILED_PRECONDITION",
    readonly reason: string,
    readonly violations: Violation[] = [],
  ) {
    super(`${code} ${reason}${violations.map((v) => ` ${v.field}: ${v.description}`).join(";")}`);
  }
}

export interface OpenContext {
  method: string;
  identity: string;
  requestId: string;
  subject: Subject;
  nowMs: number;
  servedSchemaVersion: string;
  /** Current field-encryption private keys by key id (raw 32-byte X25519). */
  privateKeys: ReadonlyMap<string, Uint8Array>;
  retiredKeyIds: ReadonlySet<string>;
  /** Where the envelope sits in its request, for violation paths: "features" (the default),
   * "sealed_account" (AdjustLimit's account state) or "event.sealed_figures". */
  path?: string;
}

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,64}$/;
const TENANT = /^[a-z][a-z0-9-]{0,62}$/;
const PSEUDONYM = /^[0-9a-f]{64}$/;
const KEY_ID = /^[A-Za-z0-9._-]{1,64}$/;
const SCHEMA_VERSION = /^[A-Za-z0-9._:/-]{1,128}$/;
const FEATURE_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;
const MAX_FIELDS = 64;
const MAX_FIELD_CIPHERTEXT_BYTES = 1024;

function invalid(...violations: Array<[string, string, string]>): EnvelopeError {
  return new EnvelopeError(
    "INVALID_ARGUMENT",
    "INVALID_ARGUMENT",
    violations.map(([field, reason, description]) => ({ field, reason, description })),
  );
}

/** The schema version an envelope at each sealed path must carry (else the served model's). */
const SEALED_SCHEMA_VERSIONS: Readonly<Record<string, string>> = {
  sealed_account: ACCOUNT_SCHEMA_VERSION,
  "event.sealed_figures": EVENT_SCHEMA_VERSION,
};

/** Stage 1: the request's structure. */
function checkStructure(features: EncryptedFeaturesMessage, ctx: OpenContext, at: string): void {
  const v: Array<[string, string, string]> = [];
  const pattern = (field: string, text: string, shape: RegExp) => {
    if (!text) v.push([field, "REQUIRED_FIELD", "is required"]);
    else if (!shape.test(text)) v.push([field, "INVALID_FIELD", "has the wrong shape"]);
  };
  pattern("request_id", ctx.requestId, REQUEST_ID);
  pattern("subject.tenant", ctx.subject.tenant, TENANT);
  pattern("subject.pseudonym", ctx.subject.pseudonym, PSEUDONYM);
  const sealedVersion = SEALED_SCHEMA_VERSIONS[at];
  if (sealedVersion === undefined) {
    pattern(`${at}.schema_version`, features.schema_version, SCHEMA_VERSION);
  } else if (!features.schema_version) {
    v.push([`${at}.schema_version`, "REQUIRED_FIELD", "is required"]);
  } else if (features.schema_version !== sealedVersion) {
    // Account state and event figures have one schema each: another is malformed, not a
    // model the server does not serve.
    v.push([`${at}.schema_version`, "INVALID_FIELD", `must be ${sealedVersion}`]);
  }
  const key = features.data_key;
  pattern(`${at}.data_key.key_id`, key.key_id, KEY_ID);
  if (key.encapsulated_key.length !== ENCAPSULATED_KEY_BYTES) {
    v.push([`${at}.data_key.encapsulated_key`, "INVALID_FIELD", "must be 32 bytes"]);
  }
  if (key.sealed_key.length !== SEALED_KEY_BYTES) {
    v.push([`${at}.data_key.sealed_key`, "INVALID_FIELD", `must be ${SEALED_KEY_BYTES} bytes`]);
  }
  if (features.fields.length === 0) {
    v.push([`${at}.fields`, "REQUIRED_FIELD", "must hold at least one field"]);
  }
  if (features.fields.length > MAX_FIELDS) {
    v.push([`${at}.fields`, "INVALID_FIELD", `must hold at most ${MAX_FIELDS} fields`]);
  } else {
    const seen = new Set<string>();
    features.fields.forEach((field, i) => {
      const path = `${at}.fields[${i}]`;
      if (!field.name) v.push([`${path}.name`, "REQUIRED_FIELD", "is required"]);
      else if (!FEATURE_NAME.test(field.name)) v.push([`${path}.name`, "INVALID_FIELD", "bad name"]);
      else if (seen.has(field.name)) v.push([`${path}.name`, "INVALID_FIELD", "repeats a name"]);
      seen.add(field.name);
      if (field.key_id !== key.key_id) {
        v.push([`${path}.key_id`, "INVALID_FIELD", "must equal data_key.key_id"]);
      }
      if (field.nonce.length !== NONCE_BYTES) {
        v.push([`${path}.nonce`, "INVALID_FIELD", `must be ${NONCE_BYTES} bytes`]);
      }
      const size = field.ciphertext.length;
      if (size <= TAG_BYTES || size > MAX_FIELD_CIPHERTEXT_BYTES) {
        v.push([`${path}.ciphertext`, "INVALID_FIELD", "has the wrong size"]);
      }
    });
  }
  if (v.length > 0) throw invalid(...v);
}

/** Open one request's features as docs/envelope.md section 7 says a server does. */
export async function openFeatures(
  features: EncryptedFeaturesMessage,
  ctx: OpenContext,
): Promise<Features> {
  const at = ctx.path ?? "features";
  checkStructure(features, ctx, at);
  const served = SEALED_SCHEMA_VERSIONS[at] ?? ctx.servedSchemaVersion;
  if (features.schema_version !== served) {
    throw new EnvelopeError("FAILED_PRECONDITION", "SCHEMA_VERSION_MISMATCH");
  }
  const keyId = features.data_key.key_id;
  const privateKey = ctx.privateKeys.get(keyId);
  if (privateKey === undefined) {
    const reason = ctx.retiredKeyIds.has(keyId) ? "KEY_RETIRED" : "KEY_UNKNOWN";
    throw new EnvelopeError("FAILED_PRECONDITION", reason);
  }
  let plaintext: Uint8Array;
  try {
    const recipientKey = await HPKE_SUITE.kem.importKey("raw", own(privateKey), false);
    plaintext = own(
      await HPKE_SUITE.open(
        {
          recipientKey,
          enc: own(features.data_key.encapsulated_key),
          info: hpkeInfo(ctx.method, ctx.identity),
        },
        own(features.data_key.sealed_key),
      ),
    );
  } catch {
    throw invalid([`${at}.data_key`, "DECRYPTION_FAILED", "does not open"]);
  }
  if (plaintext.length !== GRANT_BYTES) {
    throw invalid([`${at}.data_key`, "INVALID_DATA_KEY", "is not a format 2 data key"]);
  }
  const grant: Grant = decodeGrant(plaintext);
  if (
    !(grant.maxAgeMs > 0 && grant.maxAgeMs <= CEILING_KEY_LIMITS.maxAgeMs) ||
    !(grant.maxRequests > 0 && grant.maxRequests <= CEILING_KEY_LIMITS.maxRequests) ||
    !(grant.maxBytes > 0 && grant.maxBytes <= CEILING_KEY_LIMITS.maxBytes)
  ) {
    throw invalid([`${at}.data_key`, "INVALID_DATA_KEY", "grants limits out of range"]);
  }
  if (ctx.nowMs < grant.madeAtMs - CLOCK_SKEW_MS) {
    throw new EnvelopeError("FAILED_PRECONDITION", "DATA_KEY_NOT_YET_VALID");
  }
  if (ctx.nowMs > grant.madeAtMs + grant.maxAgeMs + CLOCK_SKEW_MS) {
    throw new EnvelopeError("FAILED_PRECONDITION", "DATA_KEY_EXPIRED");
  }
  const bytes = features.fields.reduce((n, f) => n + f.ciphertext.length - TAG_BYTES, 0);
  if (bytes > grant.maxBytes) throw new EnvelopeError("FAILED_PRECONDITION", "DATA_KEY_EXHAUSTED");
  const values: Features = {};
  const violations: Array<[string, string, string]> = [];
  features.fields.forEach((field, i) => {
    const path = `${at}.fields[${i}].ciphertext`;
    const aad = fieldAad(features.schema_version, ctx.requestId, ctx.subject, field.name);
    const opened = decryptField(grant.dataKey, field.nonce, field.ciphertext, aad);
    if (opened === null) {
      violations.push([path, "DECRYPTION_FAILED", `field ${field.name} does not decrypt`]);
      return;
    }
    const value = decodeFeatureValue(opened);
    if (value === null) {
      violations.push([path, "MALFORMED_VALUE", `field ${field.name} is not a FeatureValue`]);
    } else if (typeof value === "number" && !Number.isFinite(value)) {
      violations.push([path, "MALFORMED_VALUE", `field ${field.name} is not a finite number`]);
    } else {
      values[field.name] = value;
    }
  });
  if (violations.length > 0) throw invalid(...violations);
  return values;
}
