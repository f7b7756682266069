// Keys from files (docs/envelope.md section 2): a public keyset document's primary key with
// its id (for a caller that passes the key explicitly, or pins one; a client made with
// `PrivscoreClient.discovered` asks the server instead), and the caller's SPIFFE identity.

import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";

import type { ServerPublicKey } from "./sealing.js";

interface KeysetEntry {
  key_id: string;
  public_key: string;
  primary: boolean;
}

/** The primary key of a public keyset document (`keys/public-keys.json`). */
export function parsePublicKeyset(document: string): ServerPublicKey {
  const data = JSON.parse(document) as { keys?: KeysetEntry[] };
  const primary = (data.keys ?? []).find((key) => key.primary);
  if (primary === undefined) throw new Error("the public keyset has no primary key");
  const publicKey = new Uint8Array(Buffer.from(primary.public_key, "base64"));
  if (publicKey.length !== 32) throw new Error("the primary key is not a 32-byte X25519 key");
  return { keyId: primary.key_id, publicKey };
}

export function loadPublicKeyset(path: string): ServerPublicKey {
  return parsePublicKeyset(readFileSync(path, "utf8"));
}

/** The identity the server reads from a client certificate: its one URI SAN if that is a
 * `spiffe://` id, else null (the server then refuses every call). */
export function certificateIdentity(pem: string | Buffer): string | null {
  const names = new X509Certificate(pem).subjectAltName ?? "";
  const uris = [...names.matchAll(/(?:^|, )URI:("(?:[^"\\]|\\.)*"|[^,]*)/g)].map((m) =>
    m[1]!.startsWith('"') ? (JSON.parse(m[1]!) as string) : m[1]!,
  );
  return uris.length === 1 && uris[0]!.startsWith("spiffe://") ? uris[0]! : null;
}
