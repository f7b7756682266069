// Choosing the key to seal to from what DiscoveryService.GetServerInfo said, with and without a
// pinned key; and the x-request-id header. Pure functions: no server.

import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { describe, it } from "node:test";

import * as grpc from "@grpc/grpc-js";

import {
  DiscoveryRefused,
  REQUEST_ID_TRAILER,
  SEALING_FORMAT,
  fromHex,
  loadServices,
  requestIdMetadata,
  schemaVersionOf,
  sealingKey,
  type ServerInfo,
  type ServerPublicKey,
} from "../src/index.js";
import { envelope } from "./vectors.js";

/** A fresh X25519 public key, raw 32 bytes (the last 32 bytes of its SPKI DER). */
function freshKey(): Uint8Array {
  const der = generateKeyPairSync("x25519").publicKey.export({ type: "spki", format: "der" });
  return new Uint8Array(der.subarray(der.length - 32));
}

const primaryKey = fromHex(envelope.server_key.public_key);
const primaryId = envelope.server_key.key_id;
const activeKey = freshKey();

/** Shaped as @grpc/proto-loader gives it (keepCase, enums as names, bytes as Buffers); the
 * primary deliberately not first, so the choice is by status, not by position. */
function info(overrides: Partial<ServerInfo> = {}): ServerInfo {
  return {
    sealing_keys: [
      { key_id: "fk-old", public_key: Buffer.from(activeKey), status: "SEALING_KEY_STATUS_ACTIVE" },
      { key_id: primaryId, public_key: Buffer.from(primaryKey), status: "SEALING_KEY_STATUS_PRIMARY" },
    ],
    sealing_format: SEALING_FORMAT,
    model_version: "m-1",
    schema_version: "german-credit-test",
    policy_version: "p-1",
    features: [],
    model_manifest_sha256: "0".repeat(64),
    ...overrides,
  };
}

function refuses(run: () => unknown, pattern: RegExp): void {
  assert.throws(run, (error: unknown) => {
    assert.ok(error instanceof DiscoveryRefused, String(error));
    assert.equal(error.name, "DiscoveryRefused");
    assert.match(error.message, pattern);
    return true;
  });
}

describe("sealingKey without a pinned key", () => {
  it("takes the server's single primary key", () => {
    const key = sealingKey(info());
    assert.equal(key.keyId, primaryId);
    assert.deepEqual(key.publicKey, primaryKey);
    assert.ok(!(key.publicKey instanceof Buffer), "a Uint8Array of its own, not the wire's Buffer");
  });

  it("reads the status as a name or as its number", () => {
    const numbered = info({
      sealing_keys: [
        { key_id: "fk-old", public_key: activeKey, status: 2 },
        { key_id: primaryId, public_key: primaryKey, status: 1 },
      ],
    });
    assert.equal(sealingKey(numbered).keyId, primaryId);
  });

  it("refuses no primary, two primaries and a primary that is not 32 bytes", () => {
    const keys = info().sealing_keys;
    refuses(() => sealingKey(info({ sealing_keys: [keys[0]!] })), /no single primary/);
    refuses(() => sealingKey(info({ sealing_keys: [] })), /no single primary/);
    const two = [keys[1]!, { ...keys[0]!, status: "SEALING_KEY_STATUS_PRIMARY" as const }];
    refuses(() => sealingKey(info({ sealing_keys: two })), /no single primary/);
    const short = [{ ...keys[1]!, public_key: primaryKey.subarray(0, 31) }];
    refuses(() => sealingKey(info({ sealing_keys: short })), /32-byte X25519/);
  });
});

describe("sealingKey with a pinned key", () => {
  it("takes the pinned key when the server lists it, primary or not", () => {
    const pinnedPrimary: ServerPublicKey = { keyId: primaryId, publicKey: new Uint8Array(primaryKey) };
    assert.deepEqual(sealingKey(info(), pinnedPrimary), pinnedPrimary);
    const pinnedActive: ServerPublicKey = { keyId: "fk-old", publicKey: new Uint8Array(activeKey) };
    assert.deepEqual(sealingKey(info(), pinnedActive), pinnedActive);
  });

  it("refuses a key id the server does not list", () => {
    refuses(
      () => sealingKey(info(), { keyId: "fk-mine", publicKey: freshKey() }),
      /does not list the pinned key fk-mine/,
    );
  });

  it("refuses the server's key id with other bytes", () => {
    refuses(
      () => sealingKey(info(), { keyId: primaryId, publicKey: freshKey() }),
      new RegExp(`does not list the pinned key ${primaryId}`),
    );
    const flipped = new Uint8Array(primaryKey);
    flipped[31]! ^= 1;
    refuses(() => sealingKey(info(), { keyId: primaryId, publicKey: flipped }), /does not list/);
  });

  it("refuses a pinned key that is not 32 bytes or has no id, even when listed so", () => {
    const short = primaryKey.subarray(0, 31);
    const listed = info({
      sealing_keys: [{ key_id: "fk-short", public_key: short, status: "SEALING_KEY_STATUS_PRIMARY" }],
    });
    refuses(() => sealingKey(listed, { keyId: "fk-short", publicKey: short }), /32-byte X25519/);
    refuses(() => sealingKey(info(), { keyId: "", publicKey: primaryKey }), /no key id/);
  });

  it("refuses an empty key list", () => {
    refuses(
      () => sealingKey(info({ sealing_keys: [] }), { keyId: primaryId, publicKey: primaryKey }),
      /does not list the pinned key/,
    );
  });
});

describe("the sealing format and the schema version", () => {
  it("refuse a sealing format other than 2, pinned or not", () => {
    for (const format of [0, 1, 3]) {
      refuses(() => sealingKey(info({ sealing_format: format })), new RegExp(`format ${format}`));
      refuses(
        () => sealingKey(info({ sealing_format: format }), { keyId: primaryId, publicKey: primaryKey }),
        /sealing format/,
      );
    }
  });

  it("take the schema version the server names, and refuse none", () => {
    assert.equal(schemaVersionOf(info()), "german-credit-test");
    refuses(() => schemaVersionOf(info({ schema_version: "" })), /no schema version/);
  });
});

describe("GetServerInfoResponse from the wire", () => {
  it("decodes, with the repository's protos, to what sealingKey reads", () => {
    const services = loadServices() as unknown as {
      privscore: { v1: { DiscoveryService: grpc.ServiceClientConstructor } };
    };
    const method = services.privscore.v1.DiscoveryService.service.GetServerInfo!;
    const wire = method.responseSerialize({
      sealing_keys: [
        {
          key_id: primaryId,
          public_key: Buffer.from(primaryKey),
          status: "SEALING_KEY_STATUS_PRIMARY",
          created_at: { seconds: 1_700_000_000 },
        },
        { key_id: "fk-old", public_key: Buffer.from(activeKey), status: "SEALING_KEY_STATUS_ACTIVE" },
      ],
      sealing_format: 2,
      schema_version: "german-credit-test",
      features: [{ name: "credit_amount", kind: "FEATURE_KIND_NUMERIC", min: 0 }],
    });
    const decoded = method.responseDeserialize(wire) as ServerInfo;
    assert.equal(decoded.sealing_keys[0]!.status, "SEALING_KEY_STATUS_PRIMARY");
    assert.equal(decoded.sealing_keys[0]!.created_at?.seconds, "1700000000");
    assert.equal(decoded.features[0]!.kind, "FEATURE_KIND_NUMERIC");
    assert.deepEqual(sealingKey(decoded), { keyId: primaryId, publicKey: primaryKey });
    const pinned = { keyId: "fk-old", publicKey: activeKey };
    assert.deepEqual(sealingKey(decoded, pinned), pinned);
    refuses(() => sealingKey(decoded, { keyId: "fk-old", publicKey: primaryKey }), /does not list/);
    assert.equal(schemaVersionOf(decoded), "german-credit-test");
  });
});

describe("the x-request-id header", () => {
  it("carries the message's request id when the server would take it", () => {
    for (const id of ["ts-score-1", "a", "A.b_c:d-9", "x".repeat(64), "0123456789abcdef0123456789abcdef"]) {
      assert.deepEqual(requestIdMetadata(id).get(REQUEST_ID_TRAILER), [id]);
    }
  });

  it("is left out for an id the server would not take (it makes its own)", () => {
    for (const id of [undefined, "", "x".repeat(65), "a b", "a/b", "ü", "a\n"]) {
      assert.deepEqual(requestIdMetadata(id).get(REQUEST_ID_TRAILER), []);
    }
  });
});
