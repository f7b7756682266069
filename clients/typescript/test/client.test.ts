// The parts of the client that need no server: data-key reuse, rich error details.

import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, it } from "node:test";

import * as grpc from "@grpc/grpc-js";
import protobuf from "protobufjs";

import {
  DataKeyCache,
  PrivscoreError,
  SCORE_METHOD,
  STATUS_DETAILS_TRAILER,
  decodeStatusDetails,
  fromHex,
  loadServices,
  parsePublicKeyset,
  vendoredProtoDir,
} from "../src/index.js";
import { envelope } from "./vectors.js";

const server = { keyId: envelope.server_key.key_id, publicKey: fromHex(envelope.server_key.public_key) };
const identity = "spiffe://privscore.dev/client/dev";

describe("DataKeyCache", () => {
  it("reuses one key per method within its requests, then seals anew", async () => {
    const cache = new DataKeyCache(server, identity, { maxAgeMs: 60_000, maxRequests: 2, maxBytes: 1000 });
    const first = await cache.take(SCORE_METHOD, 10, 1);
    assert.equal(await cache.take(SCORE_METHOD, 10, 1), first);
    const third = await cache.take(SCORE_METHOD, 10, 1);
    assert.notEqual(third, first);
    assert.notEqual(await cache.take("/privscore.v1.LimitService/AdjustLimit", 10, 1), third);
    assert.equal(cache.sealedKeys, 3);
  });

  it("retires a key by bytes, by age and when a call under it failed", async () => {
    let now = 0;
    const cache = new DataKeyCache(server, identity, { maxAgeMs: 1000, maxRequests: 100, maxBytes: 25 }, () => now);
    const first = await cache.take(SCORE_METHOD, 20, 1);
    const second = await cache.take(SCORE_METHOD, 10, 1);
    assert.notEqual(second, first);
    now = 1000;
    const third = await cache.take(SCORE_METHOD, 1, 1);
    assert.notEqual(third, second);
    await cache.retire(SCORE_METHOD, third);
    assert.notEqual(await cache.take(SCORE_METHOD, 1, 1), third);
  });

  it("with reuse off seals a key per request, granted one request and its bytes", async () => {
    const cache = new DataKeyCache(server, identity, { maxAgeMs: 300_000, maxRequests: 0, maxBytes: 0 });
    const first = await cache.take(SCORE_METHOD, 25, 4);
    const second = await cache.take(SCORE_METHOD, 25, 4);
    assert.notEqual(first, second);
    assert.deepEqual(
      [first.grant.maxAgeMs, first.grant.maxRequests, first.grant.maxBytes],
      [300_000, 1, 25],
    );
  });
});

describe("rich errors", () => {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) =>
    target.startsWith("google/rpc/") ? join(vendoredProtoDir(), target) : target;
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
  const pack = (name: string, body: object) => ({
    type_url: `type.googleapis.com/${name}`,
    value: root.lookupType(name).encode(root.lookupType(name).fromObject(body)).finish(),
  });
  const status = root
    .lookupType("google.rpc.Status")
    .encode(
      root.lookupType("google.rpc.Status").fromObject({
        code: 3,
        message: "invalid request: features.fields[2]",
        details: [
          pack("google.rpc.BadRequest", {
            field_violations: [
              { field: "features.fields[2]", description: "feature purpose is not a category", reason: "UNKNOWN_CATEGORY" },
            ],
          }),
          pack("google.rpc.ErrorInfo", { reason: "INVALID_ARGUMENT", domain: "privscore.v1" }),
          pack("google.rpc.RetryInfo", {}),
        ],
      }),
    )
    .finish();

  it("decodes a google.rpc.Status with BadRequest and ErrorInfo", () => {
    const details = decodeStatusDetails(status);
    assert.equal(details.code, 3);
    assert.deepEqual(details.fieldViolations, [
      { field: "features.fields[2]", description: "feature purpose is not a category", reason: "UNKNOWN_CATEGORY" },
    ]);
    assert.deepEqual(details.errorInfo, { reason: "INVALID_ARGUMENT", domain: "privscore.v1", metadata: {} });
    assert.deepEqual(details.otherDetails, ["type.googleapis.com/google.rpc.RetryInfo"]);
  });

  it("reads the details and the request id from a failed call's trailers", () => {
    const trailers = new grpc.Metadata();
    trailers.set(STATUS_DETAILS_TRAILER, Buffer.from(status));
    trailers.set("x-request-id", "req-42");
    const error = new PrivscoreError({ code: grpc.status.INVALID_ARGUMENT, details: "invalid request", metadata: trailers });
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_ARGUMENT");
    assert.equal(error.domain, "privscore.v1");
    assert.equal(error.requestId, "req-42");
    assert.equal(error.fieldViolations[0]?.reason, "UNKNOWN_CATEGORY");
  });
});

describe("contracts", () => {
  it("load with the repository's protos and the vendored google/rpc ones", () => {
    const services = loadServices() as { privscore: { v1: Record<string, unknown> } };
    for (const name of ["ScoringService", "LimitService", "AlertService", "DiscoveryService"]) {
      assert.equal(typeof services.privscore.v1[name], "function", name);
    }
  });

  it("take the primary key of a public keyset", () => {
    const key = Buffer.from(server.publicKey).toString("base64");
    const keyset = JSON.stringify({
      format: 1,
      keys: [
        { key_id: "fk-new", public_key: key, primary: true },
        { key_id: "fk-old", public_key: Buffer.alloc(32).toString("base64"), primary: false },
      ],
    });
    assert.deepEqual(parsePublicKeyset(keyset), { keyId: "fk-new", publicKey: server.publicKey });
  });
});
