// What the server says over the wire (DiscoveryService.GetServerInfo): the keys to seal data
// keys to, the sealing format, the schema version and the versions it serves. A caller needs
// nothing from the server's disk. A caller that must not trust first use pins the key it
// expects (key id and raw public key); the server must list exactly that key, or the client
// refuses before any call that carries data.

import { equalBytes } from "./bytes.js";
import { SEALING_FORMAT, type ServerPublicKey } from "./sealing.js";

export const GET_SERVER_INFO_METHOD = "/privscore.v1.DiscoveryService/GetServerInfo";
export const X25519_PUBLIC_KEY_BYTES = 32;

/** SealingKeyStatus, as @grpc/proto-loader gives it (`enums: String`) or as its number. */
export type SealingKeyStatus =
  | "SEALING_KEY_STATUS_UNSPECIFIED"
  | "SEALING_KEY_STATUS_PRIMARY"
  | "SEALING_KEY_STATUS_ACTIVE"
  | number;

/** privscore.v1.SealingKey (keepCase). */
export interface SealingKeyInfo {
  key_id: string;
  /** The raw 32-byte X25519 public key (a Buffer from the wire). */
  public_key: Uint8Array;
  status: SealingKeyStatus;
  created_at?: { seconds: string | number; nanos: number } | null;
}

/** privscore.v1.FeatureSpec (keepCase; `min`/`max` are absent when unbounded). */
export interface FeatureSpecInfo {
  name: string;
  kind: "FEATURE_KIND_UNSPECIFIED" | "FEATURE_KIND_NUMERIC" | "FEATURE_KIND_CATEGORICAL" | number;
  categories: string[];
  min?: number | null;
  max?: number | null;
  integer: boolean;
  reason_code: string;
  description: string;
}

/** privscore.v1.GetServerInfoResponse (keepCase). */
export interface ServerInfo {
  sealing_keys: SealingKeyInfo[];
  sealing_format: number;
  model_version: string;
  schema_version: string;
  policy_version: string;
  features: FeatureSpecInfo[];
  model_manifest_sha256: string;
}

/** What the server said cannot be used: the client makes no call with it. */
export class DiscoveryRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DiscoveryRefused";
  }
}

function isPrimary(status: SealingKeyStatus): boolean {
  return status === "SEALING_KEY_STATUS_PRIMARY" || status === 1;
}

function checkKey(key: ServerPublicKey, what: string): void {
  if (!key.keyId) throw new DiscoveryRefused(`${what} has no key id`);
  if (key.publicKey.length !== X25519_PUBLIC_KEY_BYTES) {
    throw new DiscoveryRefused(
      `${what} ${key.keyId} is not a ${X25519_PUBLIC_KEY_BYTES}-byte X25519 public key`,
    );
  }
}

/**
 * The key to seal to, as the Python SDK's `sealing_key` chooses it: with `pinned`, the pinned
 * key, which the server must list under the same key id with the same bytes (whatever its
 * status); without, the server's single PRIMARY key (trust on first use). Refuses a sealing
 * format other than SEALING_FORMAT.
 */
export function sealingKey(info: ServerInfo, pinned?: ServerPublicKey): ServerPublicKey {
  if (info.sealing_format !== SEALING_FORMAT) {
    throw new DiscoveryRefused(
      `the server opens sealing format ${info.sealing_format}; this client seals format ` +
        `${SEALING_FORMAT}`,
    );
  }
  if (pinned !== undefined) {
    checkKey(pinned, "the pinned key");
    const listed = info.sealing_keys.find((key) => key.key_id === pinned.keyId);
    if (listed === undefined || !equalBytes(new Uint8Array(listed.public_key), pinned.publicKey)) {
      throw new DiscoveryRefused(
        `the server does not list the pinned key ${pinned.keyId}: refusing to seal to a key ` +
          "it names instead",
      );
    }
    return { keyId: pinned.keyId, publicKey: new Uint8Array(pinned.publicKey) };
  }
  const primary = info.sealing_keys.filter((key) => isPrimary(key.status));
  if (primary.length !== 1) {
    throw new DiscoveryRefused("the server names no single primary sealing key");
  }
  const key = { keyId: primary[0]!.key_id, publicKey: new Uint8Array(primary[0]!.public_key) };
  checkKey(key, "the server's primary key");
  return key;
}

/** The schema version requests must name, as the server says it (refused when empty). */
export function schemaVersionOf(info: ServerInfo): string {
  if (!info.schema_version) throw new DiscoveryRefused("the server names no schema version");
  return info.schema_version;
}
