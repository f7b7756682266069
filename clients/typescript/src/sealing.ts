// Sealing format 2, the caller's side (docs/envelope.md sections 4-6): a random AES-256 data
// key and its grant sealed with HPKE to the server's X25519 key for one method and one caller
// identity; each value (a feature, an account's state, an event's figure) encrypted with
// AES-256-GCM under the data key, bound to the schema version, request id, subject and field
// name.

import { createCipheriv, createDecipheriv, randomBytes as nodeRandomBytes } from "node:crypto";

import { Aes256Gcm, CipherSuite, DhkemX25519HkdfSha256, HkdfSha256 } from "@hpke/core";

import { concat, lengthPrefixed, own, u32be, u64be, utf8 } from "./bytes.js";
import { encodeFeatureValue, type Features } from "./featureValue.js";

export const SEALING_FORMAT = 2;
export const INFO_LABEL = utf8("privscore.v1/data-key.v2\0");
export const FIELD_AAD_LABEL = utf8("privscore.v1/field.v2\0");
export const DATA_KEY_BYTES = 32;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const ENCAPSULATED_KEY_BYTES = 32;
export const GRANT_BYTES = 56;
export const SEALED_KEY_BYTES = GRANT_BYTES + TAG_BYTES;
/** Random 96-bit nonces: one data key encrypts at most 2^24 fields, whatever its grant. */
export const MAX_ENCRYPTIONS_PER_KEY = 2 ** 24;
export const CLOCK_SKEW_MS = 60_000;

export const SCORE_METHOD = "/privscore.v1.ScoringService/Score";
export const SCORE_BATCH_METHOD = "/privscore.v1.ScoringService/ScoreBatch";
export const ADJUST_LIMIT_METHOD = "/privscore.v1.LimitService/AdjustLimit";
export const EVALUATE_EVENT_METHOD = "/privscore.v1.AlertService/EvaluateEvent";

/** RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM. */
export const HPKE_SUITE = new CipherSuite({
  kem: new DhkemX25519HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Aes256Gcm(),
});

/** How long, for how many requests and how many plaintext bytes one data key serves. */
export interface KeyLimits {
  maxAgeMs: number;
  maxRequests: number;
  maxBytes: number;
}

export const DEFAULT_KEY_LIMITS: Readonly<KeyLimits> = {
  maxAgeMs: 300_000,
  maxRequests: 10_000,
  maxBytes: 16 * 1024 * 1024,
};
export const CEILING_KEY_LIMITS: Readonly<KeyLimits> = {
  maxAgeMs: 3_600_000,
  maxRequests: 1_000_000,
  maxBytes: 2 ** 30,
};

/** Limits between 0 and the ceilings; any 0 turns reuse off (a fresh key per request). */
export function checkKeyLimits(limits: KeyLimits): KeyLimits {
  for (const name of ["maxAgeMs", "maxRequests", "maxBytes"] as const) {
    const value = limits[name];
    if (!Number.isInteger(value) || value < 0 || value > CEILING_KEY_LIMITS[name]) {
      throw new RangeError(`${name} must be an integer from 0 to ${CEILING_KEY_LIMITS[name]}`);
    }
  }
  return { ...limits };
}

export function reuses(limits: KeyLimits): boolean {
  return limits.maxAgeMs > 0 && limits.maxRequests > 0 && limits.maxBytes > 0;
}

export interface Subject {
  tenant: string;
  pseudonym: string;
}

/** The sealed plaintext: the data key and what it may be used for. */
export interface Grant {
  dataKey: Uint8Array;
  madeAtMs: number;
  maxAgeMs: number;
  maxRequests: number;
  maxBytes: number;
}

export function encodeGrant(grant: Grant): Uint8Array {
  if (grant.dataKey.length !== DATA_KEY_BYTES) throw new RangeError("a data key has 32 bytes");
  return concat(
    grant.dataKey,
    u64be(grant.madeAtMs),
    u32be(grant.maxAgeMs),
    u32be(grant.maxRequests),
    u64be(grant.maxBytes),
  );
}

export function decodeGrant(bytes: Uint8Array): Grant {
  if (bytes.length !== GRANT_BYTES) throw new RangeError(`a grant has ${GRANT_BYTES} bytes`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    dataKey: bytes.slice(0, 32),
    madeAtMs: Number(view.getBigUint64(32)),
    maxAgeMs: view.getUint32(40),
    maxRequests: view.getUint32(44),
    maxBytes: Number(view.getBigUint64(48)),
  };
}

/** HPKE info: a key sealed by one caller for one method opens for no other of either. */
export function hpkeInfo(method: string, identity: string): Uint8Array {
  return lengthPrefixed(INFO_LABEL, method, identity);
}

export function fieldAad(
  schemaVersion: string,
  requestId: string,
  subject: Subject,
  name: string,
): Uint8Array {
  return lengthPrefixed(
    FIELD_AAD_LABEL,
    schemaVersion,
    requestId,
    subject.tenant,
    subject.pseudonym,
    name,
  );
}

export function encryptField(
  key: Uint8Array,
  nonce: Uint8Array,
  plaintext: Uint8Array,
  aad: Uint8Array,
): Uint8Array {
  const cipher = createCipheriv("aes-256-gcm", key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad);
  return concat(cipher.update(plaintext), cipher.final(), cipher.getAuthTag());
}

/** The plaintext, or null when the ciphertext does not authenticate under this key and aad. */
export function decryptField(
  key: Uint8Array,
  nonce: Uint8Array,
  ciphertext: Uint8Array,
  aad: Uint8Array,
): Uint8Array | null {
  if (nonce.length !== NONCE_BYTES || ciphertext.length < TAG_BYTES) return null;
  const body = ciphertext.subarray(0, ciphertext.length - TAG_BYTES);
  const decipher = createDecipheriv("aes-256-gcm", key, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(aad);
  decipher.setAuthTag(ciphertext.subarray(ciphertext.length - TAG_BYTES));
  try {
    return concat(decipher.update(body), decipher.final());
  } catch {
    return null;
  }
}

// The wire messages, with the .proto field names (@grpc/proto-loader with keepCase: true).

export interface SealedDataKeyMessage {
  key_id: string;
  encapsulated_key: Uint8Array;
  sealed_key: Uint8Array;
}

export interface EncryptedFieldMessage {
  name: string;
  key_id: string;
  nonce: Uint8Array;
  ciphertext: Uint8Array;
}

export interface EncryptedFeaturesMessage {
  schema_version: string;
  data_key: SealedDataKeyMessage;
  fields: EncryptedFieldMessage[];
}

/** The server key callers seal to: its id and raw 32-byte X25519 public key. */
export interface ServerPublicKey {
  keyId: string;
  publicKey: Uint8Array;
}

export type RandomBytes = (size: number) => Uint8Array;

const osRandom: RandomBytes = (size) => new Uint8Array(nodeRandomBytes(size));

export interface DataKeyOptions {
  /** When the grant says the key was made (ms since the epoch); default now. */
  madeAtMs?: number;
  /** Draws the data key and every field nonce; default the OS's CSPRNG. For test vectors. */
  randomBytes?: RandomBytes;
  /** Fixed HPKE ephemeral input keying material (RFC 9180 DeriveKeyPair). Test vectors only. */
  ikmE?: Uint8Array;
}

/**
 * A data key sealed to the server for one identity and one method, with its grant. It may seal
 * the features of many requests (each under its own request id) within its grant; it refuses
 * to encrypt more than MAX_ENCRYPTIONS_PER_KEY fields.
 */
export class DataKey {
  readonly sealed: SealedDataKeyMessage;
  readonly grant: Grant;
  readonly method: string;
  readonly #random: RandomBytes;
  #encryptions = 0;

  private constructor(
    sealed: SealedDataKeyMessage,
    grant: Grant,
    method: string,
    random: RandomBytes,
  ) {
    this.sealed = sealed;
    this.grant = grant;
    this.method = method;
    this.#random = random;
  }

  static async create(
    server: ServerPublicKey,
    method: string,
    identity: string,
    limits: KeyLimits,
    options: DataKeyOptions = {},
  ): Promise<DataKey> {
    checkKeyLimits(limits);
    if (!reuses(limits)) throw new RangeError("a data key's grant needs every limit above 0");
    if (!identity) throw new Error("sealing binds the caller's certificate identity: none given");
    const random = options.randomBytes ?? osRandom;
    const grant: Grant = {
      dataKey: own(random(DATA_KEY_BYTES)),
      madeAtMs: options.madeAtMs ?? Date.now(),
      ...limits,
    };
    const recipientPublicKey = await HPKE_SUITE.kem.importKey("raw", own(server.publicKey), true);
    const sealed = await HPKE_SUITE.seal(
      {
        recipientPublicKey,
        info: hpkeInfo(method, identity),
        ...(options.ikmE ? { ekm: own(options.ikmE) } : {}),
      },
      encodeGrant(grant),
    );
    return new DataKey(
      {
        key_id: server.keyId,
        encapsulated_key: own(sealed.enc),
        sealed_key: own(sealed.ct),
      },
      grant,
      method,
      random,
    );
  }

  /** Seal already-encoded plaintexts (serialized FeatureValues), in the order given. */
  sealEncoded(
    schemaVersion: string,
    subject: Subject,
    plaintexts: ReadonlyArray<readonly [string, Uint8Array]>,
    requestId: string,
  ): EncryptedFeaturesMessage {
    if (this.#encryptions + plaintexts.length > MAX_ENCRYPTIONS_PER_KEY) {
      throw new RangeError("this data key has sealed as many fields as it may");
    }
    this.#encryptions += plaintexts.length;
    const fields = plaintexts.map(([name, plaintext]) => {
      const nonce = own(this.#random(NONCE_BYTES));
      const aad = fieldAad(schemaVersion, requestId, subject, name);
      return {
        name,
        key_id: this.sealed.key_id,
        nonce,
        ciphertext: encryptField(this.grant.dataKey, nonce, plaintext, aad),
      };
    });
    return { schema_version: schemaVersion, data_key: this.sealed, fields };
  }

  seal(
    schemaVersion: string,
    subject: Subject,
    features: Features,
    requestId: string,
  ): EncryptedFeaturesMessage {
    return this.sealEncoded(schemaVersion, subject, encodeFeatures(features), requestId);
  }
}

export function encodeFeatures(features: Features): Array<[string, Uint8Array]> {
  return Object.entries(features).map(([name, value]) => [name, encodeFeatureValue(value)]);
}

export function plaintextBytes(plaintexts: ReadonlyArray<readonly [string, Uint8Array]>): number {
  return plaintexts.reduce((n, [, p]) => n + p.length, 0);
}

interface InUse {
  key: Promise<DataKey>;
  retiresAt: number;
  requests: number;
  bytes: number;
  encryptions: number;
}

/**
 * Sealed data keys reused across requests: one per method, retired before a request would
 * take it past its age, requests, bytes or MAX_ENCRYPTIONS_PER_KEY fields. With reuse off (any
 * limit 0), and for a request larger than a key's byte limit, each request gets a key of its
 * own granted one request and its plaintext bytes.
 */
export class DataKeyCache {
  readonly #keys = new Map<string, InUse>();
  sealedKeys = 0;

  constructor(
    readonly server: ServerPublicKey,
    readonly identity: string,
    readonly limits: KeyLimits,
    private readonly clock: () => number = () => performance.now(),
  ) {
    checkKeyLimits(limits);
  }

  #seal(method: string, limits: KeyLimits): Promise<DataKey> {
    this.sealedKeys += 1;
    return DataKey.create(this.server, method, this.identity, limits);
  }

  /** A key for one request that encrypts `fields` fields of `bytes` plaintext bytes. */
  take(method: string, bytes: number, fields: number): Promise<DataKey> {
    const limits = this.limits;
    if (!reuses(limits) || bytes > limits.maxBytes) {
      const maxAgeMs = limits.maxAgeMs || DEFAULT_KEY_LIMITS.maxAgeMs;
      return this.#seal(method, { maxAgeMs, maxRequests: 1, maxBytes: Math.max(bytes, 1) });
    }
    const now = this.clock();
    let inUse = this.#keys.get(method);
    if (
      inUse === undefined ||
      now >= inUse.retiresAt ||
      inUse.requests >= limits.maxRequests ||
      inUse.bytes + bytes > limits.maxBytes ||
      inUse.encryptions + fields > MAX_ENCRYPTIONS_PER_KEY
    ) {
      const key = this.#seal(method, limits);
      const fresh: InUse = { key, retiresAt: now + limits.maxAgeMs, requests: 0, bytes: 0, encryptions: 0 };
      key.catch(() => this.#drop(method, fresh));
      this.#keys.set(method, fresh);
      inUse = fresh;
    }
    inUse.requests += 1;
    inUse.bytes += bytes;
    inUse.encryptions += fields;
    return inUse.key;
  }

  /** Stop reusing `key` (a call under it failed: the server may refuse it from now on). */
  async retire(method: string, key: DataKey): Promise<void> {
    const inUse = this.#keys.get(method);
    if (inUse !== undefined && (await inUse.key.catch(() => null)) === key) {
      this.#drop(method, inUse);
    }
  }

  #drop(method: string, inUse: InUse): void {
    if (this.#keys.get(method) === inUse) this.#keys.delete(method);
  }
}
