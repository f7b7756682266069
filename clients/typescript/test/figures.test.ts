// Account state and event figures: FeatureValue.money_value by hand (checked against
// protobufjs reading the repository's common.proto), what each event kind seals and sends in
// clear, and the requests the client puts on the wire (serialized by the real descriptors,
// then opened as the server opens them).

import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { join } from "node:path";
import { describe, it } from "node:test";

import * as grpc from "@grpc/grpc-js";
import protobuf from "protobufjs";

import {
  ACCOUNT_SCHEMA_VERSION,
  ADJUST_LIMIT_METHOD,
  EVALUATE_EVENT_METHOD,
  EVENT_SCHEMA_VERSION,
  HPKE_SUITE,
  EnvelopeError,
  Pseudonymiser,
  PrivscoreClient,
  accountFigures,
  decodeFeatureValue,
  decodeGrant,
  encodeFeatures,
  hpkeInfo,
  plaintextBytes,
  defaultProtoRoot,
  encodeFeatureValue,
  eventFigures,
  fromHex,
  loadServices,
  openFeatures,
  toHex,
  type AccountState,
  type BehaviourEvent,
  type Connection,
  type EncryptedFeaturesMessage,
  type Features,
  type KeyLimits,
} from "../src/index.js";
import { envelope } from "./vectors.js";

/** Not on the wire: proto-loader reads an unset message field as null, an unset oneof
 * member as undefined. */
function absent(value: unknown, message?: string): void {
  assert.ok(value === null || value === undefined, message ?? `set: ${JSON.stringify(value)}`);
}

const cny = (minor: number | bigint | string) => ({ currency_code: "CNY", minor_units: minor });

describe("FeatureValue.money_value", () => {
  it("is field 4 holding a Money whose default fields are left out", () => {
    const cases: Array<[string, number | bigint | string, string]> = [
      ["CNY", 100_000, "22090a03434e5910a08d06"],
      ["CNY", 0, "22050a03434e59"],
      ["", 0, "2200"],
      ["USD", -1, "22100a0355534410ffffffffffffffffff01"],
      ["CNY", 2n ** 63n - 1n, "220f0a03434e5910ffffffffffffffff7f"],
      ["CNY", "-9223372036854775808", "22100a03434e591080808080808080808001"],
    ];
    for (const [currency_code, minor_units, hex] of cases) {
      assert.equal(toHex(encodeFeatureValue({ currency_code, minor_units })), hex, `${currency_code} ${minor_units}`);
    }
  });

  it("agrees with protobufjs reading common.proto, both ways", () => {
    const root = new protobuf.Root();
    root.loadSync(join(defaultProtoRoot(), "privscore", "v1", "common.proto"), { keepCase: true });
    const FeatureValue = root.lookupType("privscore.v1.FeatureValue");
    for (const money of [cny(1), cny(123_456_789_012), cny(-42), { currency_code: "€€€", minor_units: 7 }, cny(0)]) {
      const ours = encodeFeatureValue(money);
      if (money.minor_units !== 0) {
        // protobufjs writes a field set to its default; the canonical form (Python's) leaves it out
        const theirs = FeatureValue.encode(FeatureValue.fromObject({ money_value: money })).finish();
        assert.equal(toHex(ours), toHex(theirs));
      }
      const read = FeatureValue.toObject(FeatureValue.decode(ours), { longs: String, oneofs: true });
      assert.equal(read.kind, "money_value");
      assert.equal(String(read.money_value.minor_units ?? 0), String(money.minor_units));
      assert.deepEqual(decodeFeatureValue(ours), { currency_code: money.currency_code, minor_units: BigInt(money.minor_units) });
    }
  });

  it("decodes with protobuf's rules: a repeated Money merges, another member replaces it", () => {
    // money{CNY} then money{minor_units 5}: merged
    assert.deepEqual(decodeFeatureValue(fromHex("22050a03434e59" + "22021005")), cny(5n));
    // money then a number: the number
    assert.equal(decodeFeatureValue(fromHex("22050a03434e59" + "090000000000003840")), 24);
    // a number then money: the money, fresh
    assert.deepEqual(decodeFeatureValue(fromHex("090000000000003840" + "22021005")), { currency_code: "", minor_units: 5n });
    // unknown fields inside Money are skipped
    assert.deepEqual(decodeFeatureValue(fromHex("22071801" + "0a03434e59")), { currency_code: "CNY", minor_units: 0n });
  });

  it("refuses what is no Money", () => {
    assert.equal(decodeFeatureValue(fromHex("2203")), null); // runs past the end
    assert.equal(decodeFeatureValue(fromHex("22020a05")), null); // currency runs past Money
    assert.equal(decodeFeatureValue(fromHex("22030a01ff")), null); // currency not UTF-8
    assert.equal(decodeFeatureValue(fromHex("22021080")), null); // truncated varint
  });

  it("never rounds or wraps an amount", () => {
    for (const minor_units of [1.5, 2 ** 53, Number.NaN, "1e3", "01", " 1", 2n ** 63n, -(2n ** 63n) - 1n]) {
      assert.throws(() => encodeFeatureValue({ currency_code: "CNY", minor_units }), RangeError, String(minor_units));
    }
  });
});

const account: AccountState = {
  current_limit: cny(1_000_000),
  balance: cny(200_000),
  on_time_repayments_in_row: 12,
  days_past_due: 0,
  account_age_days: 400,
};
const at = { seconds: 1_790_000_000, nanos: 0 };

describe("account/1 figures", () => {
  it("are the account's five fields: amounts as Money, counts as numbers", () => {
    assert.deepEqual(accountFigures(account), { ...account });
    assert.deepEqual(Object.keys(accountFigures({ ...account })), [
      "current_limit",
      "balance",
      "on_time_repayments_in_row",
      "days_past_due",
      "account_age_days",
    ]);
  });

  it("refuse a missing, mistyped or unknown field", () => {
    const { balance: _, ...noBalance } = account;
    assert.throws(() => accountFigures(noBalance as AccountState), /account\.balance must be Money/);
    assert.throws(() => accountFigures({ ...account, days_past_due: 1.5 }), /whole number/);
    assert.throws(() => accountFigures({ ...account, current_limit: 5 as never }), /Money/);
    assert.throws(() => accountFigures({ ...account, score: 700 } as AccountState), /no field score/);
  });
});

describe("event/1 figures", () => {
  const cases: Array<[string, BehaviourEvent, object, Features]> = [
    ["purchase", { event_id: "e", occurred_at: at, purchase: { amount: cny(500) } }, { purchase: {} }, { amount: cny(500) }],
    [
      "repayment",
      { event_id: "e", occurred_at: at, repayment: { amount: cny(700), outcome: "REPAYMENT_OUTCOME_FAILED" }, balance_after: cny(0) },
      { repayment: { outcome: "REPAYMENT_OUTCOME_FAILED" } },
      { amount: cny(700), balance_after: cny(0) },
    ],
    [
      "missed_payment",
      { event_id: "e", occurred_at: at, missed_payment: { amount_due: cny(100_000), days_past_due: 40 } },
      { missed_payment: {} },
      { amount: cny(100_000), days_past_due: 40 },
    ],
    [
      "limit_change",
      { event_id: "e", occurred_at: at, limit_change: { new_limit: cny(2_000_000) } },
      { limit_change: {} },
      { new_limit: cny(2_000_000) },
    ],
    ["login", { event_id: "e", occurred_at: at, login: { new_device: true } }, { login: { new_device: true } }, {}],
    [
      "login with a balance",
      { event_id: "e", occurred_at: at, login: { new_device: false }, balance_after: cny(3) },
      { login: { new_device: false } },
      { balance_after: cny(3) },
    ],
  ];
  for (const [name, event, clearKind, figures] of cases) {
    it(`${name}: the kind stays in clear without its figures`, () => {
      const split = eventFigures(event);
      assert.deepEqual(split.clear, { event_id: "e", occurred_at: at, ...clearKind });
      assert.deepEqual(split.figures, figures);
    });
  }

  it("refuse no kind or two", () => {
    assert.throws(() => eventFigures({ event_id: "e", occurred_at: at }), /exactly one kind/);
    assert.throws(
      () => eventFigures({ event_id: "e", occurred_at: at, login: {}, purchase: { amount: cny(1) } }),
      /exactly one kind/,
    );
    assert.throws(
      () => eventFigures({ event_id: "e", occurred_at: at, missed_payment: { amount_due: cny(1), days_past_due: 0.5 } }),
      /whole number/,
    );
  });
});

// -- the requests on the wire -----------------------------------------------------------------

const identity = "spiffe://privscore.dev/client/dev";
const server = { keyId: envelope.server_key.key_id, publicKey: fromHex(envelope.server_key.public_key) };
const schemaVersion = envelope.keyring.served_schema_version;
const pseudonymiser = new Pseudonymiser(new Uint8Array(32).fill(7));

interface Sent {
  service: string;
  method: string;
  request: Record<string, any>;
}

/** A Connection whose stubs serialize each request with the real descriptors (what would go
 * on the wire), keep it decoded as the server's side would read it, and answer `reply`. */
function recordingConnection(sent: Sent[]): Connection {
  const v1 = (loadServices() as any).privscore.v1;
  return {
    channel: undefined as unknown as grpc.Channel,
    client(name) {
      const definition = v1[name].service as grpc.ServiceDefinition;
      const stub: Record<string, unknown> = {};
      for (const [method, d] of Object.entries(definition)) {
        stub[method] = (request: unknown, _m: grpc.Metadata, _o: grpc.CallOptions, callback: (e: null, r: unknown) => void) => {
          const wire = d.requestSerialize(request);
          sent.push({ service: name, method, request: d.requestDeserialize(wire) as Record<string, any> });
          const call = new EventEmitter();
          setImmediate(() => {
            callback(null, { method });
            call.emit("status", { code: grpc.status.OK, details: "", metadata: new grpc.Metadata() });
          });
          return call;
        };
      }
      return stub as unknown as grpc.Client;
    },
    close() {},
  };
}

function client(sent: Sent[], keyLimits?: KeyLimits): PrivscoreClient {
  return new PrivscoreClient(
    {
      target: "unused:1",
      tls: { ca: Buffer.alloc(0), cert: Buffer.alloc(0), key: Buffer.alloc(0) },
      serverKey: server,
      pseudonymiser,
      schemaVersion,
      identity,
      ...(keyLimits ? { keyLimits } : {}),
    },
    recordingConnection(sent),
  );
}

/** Open a sealed set as the server would for `method` (the vectors' server key). */
function open(sealed: EncryptedFeaturesMessage, method: string, requestId: string, subject: { tenant: string; pseudonym: string }, path: string) {
  return openFeatures(sealed, {
    path,
    method,
    identity,
    requestId,
    subject,
    nowMs: Date.now(),
    servedSchemaVersion: schemaVersion,
    privateKeys: new Map([[server.keyId, fromHex(envelope.server_key.private_key)]]),
    retiredKeyIds: new Set(),
  });
}

const money = (minor: number) => ({ currency_code: "CNY", minor_units: BigInt(minor) });
const openedAccount = {
  current_limit: money(1_000_000),
  balance: money(200_000),
  on_time_repayments_in_row: 12,
  days_past_due: 0,
  account_age_days: 400,
};

describe("AdjustLimit on the wire", () => {
  it("seals the account for AdjustLimit, and features with it under the same data key", async () => {
    const sent: Sent[] = [];
    const c = client(sent);
    await c.adjustLimit("baitiao-cn", "c-1", account, { features: { duration_in_month: 24, purpose: "A43" } }, { requestId: "req-l1" });
    const [{ request }] = sent as [Sent];
    const subject = c.subject("baitiao-cn", "c-1");
    absent(request.account, "no clear account");
    assert.equal(request.score_source, "features");
    assert.equal(request.sealed_account.schema_version, ACCOUNT_SCHEMA_VERSION);
    assert.equal(request.features.schema_version, schemaVersion);
    assert.deepEqual(request.sealed_account.data_key, request.features.data_key, "one data key");
    assert.equal(c.dataKeys.sealedKeys, 1);
    assert.deepEqual(await open(request.sealed_account, ADJUST_LIMIT_METHOD, "req-l1", subject, "sealed_account"), openedAccount);
    assert.deepEqual(await open(request.features, ADJUST_LIMIT_METHOD, "req-l1", subject, "features"), {
      duration_in_month: 24,
      purpose: "A43",
    });
    await assert.rejects(open(request.sealed_account, "/privscore.v1.ScoringService/Score", "req-l1", subject, "sealed_account"));
  });

  it("is opened at its place's schema version only (docs/envelope.md section 7)", async () => {
    const sent: Sent[] = [];
    const c = client(sent);
    await c.adjustLimit("baitiao-cn", "c-1", account, { features: { duration_in_month: 24 } }, { requestId: "req-l6" });
    const { request } = sent[0]!;
    const subject = c.subject("baitiao-cn", "c-1");
    const refusal = (error: unknown) => {
      assert.ok(error instanceof EnvelopeError, String(error));
      return { code: error.code, reason: error.reason, violations: error.violations.map((v) => [v.field, v.reason]) };
    };
    // the account envelope relabelled with the features' schema version: refused unopened
    const relabelled = { ...request.sealed_account, schema_version: schemaVersion };
    await assert.rejects(open(relabelled, ADJUST_LIMIT_METHOD, "req-l6", subject, "sealed_account"), (error) => {
      assert.deepEqual(refusal(error), {
        code: "INVALID_ARGUMENT",
        reason: "INVALID_ARGUMENT",
        violations: [["sealed_account.schema_version", "INVALID_FIELD"]],
      });
      return true;
    });
    // the account envelope sent as features: well formed, but not the served model's schema
    await assert.rejects(open(request.sealed_account, ADJUST_LIMIT_METHOD, "req-l6", subject, "features"), (error) => {
      assert.deepEqual(refusal(error), { code: "FAILED_PRECONDITION", reason: "SCHEMA_VERSION_MISMATCH", violations: [] });
      return true;
    });
  });

  it("with reuse off, grants its one key one request and both envelopes' bytes", async () => {
    const sent: Sent[] = [];
    const c = client(sent, { maxAgeMs: 300_000, maxRequests: 0, maxBytes: 0 });
    const features = { duration_in_month: 24, purpose: "A43" };
    await c.adjustLimit("baitiao-cn", "c-1", account, { features }, { requestId: "req-l5" });
    const { request } = sent[0]!;
    assert.deepEqual(request.sealed_account.data_key, request.features.data_key);
    const recipientKey = await HPKE_SUITE.kem.importKey("raw", fromHex(envelope.server_key.private_key), false);
    const grant = decodeGrant(
      new Uint8Array(
        await HPKE_SUITE.open(
          { recipientKey, enc: new Uint8Array(request.features.data_key.encapsulated_key), info: hpkeInfo(ADJUST_LIMIT_METHOD, identity) },
          new Uint8Array(request.features.data_key.sealed_key),
        ),
      ),
    );
    const bytes = plaintextBytes(encodeFeatures(accountFigures(account))) + plaintextBytes(encodeFeatures(features));
    assert.deepEqual([grant.maxRequests, grant.maxBytes, grant.maxAgeMs], [1, bytes, 300_000]);
  });

  it("without a source asks for the recorded score; latestScore states one; never both", async () => {
    const sent: Sent[] = [];
    const c = client(sent);
    await c.adjustLimit("baitiao-cn", "c-1", account, {}, { requestId: "req-l2" });
    await c.adjustLimit("baitiao-cn", "c-1", account, undefined, { requestId: "req-l3" });
    await c.adjustLimit("baitiao-cn", "c-1", account, { latestScore: 640 }, { requestId: "req-l4" });
    const [recorded, implicit, stated] = sent.map((s) => s.request);
    for (const r of [recorded!, implicit!]) {
      assert.equal(r.score_source, undefined);
      absent(r.features);
      absent(r.account);
    }
    assert.equal(stated!.score_source, "latest_score");
    assert.equal(stated!.latest_score, 640);
    assert.equal(recorded!.sealed_account.data_key.sealed_key.length, 72);
    assert.deepEqual(recorded!.sealed_account.data_key, stated!.sealed_account.data_key, "the key is reused");
    await assert.rejects(c.adjustLimit("t", "c", account, { latestScore: 1, features: {} }), /at most one/);
  });
});

describe("EvaluateEvent on the wire", () => {
  it("seals the figures for EvaluateEvent and sends the kind without them", async () => {
    const sent: Sent[] = [];
    const c = client(sent);
    const event: BehaviourEvent = {
      event_id: "evt-1",
      occurred_at: at,
      missed_payment: { amount_due: cny(100_000), days_past_due: 40 },
      balance_after: cny(250_000),
    };
    await c.evaluateEvent("baitiao-cn", "c-1", event, { requestId: "req-e1" });
    const { request } = sent[0]!;
    const sentEvent = request.event;
    assert.equal(sentEvent.kind, "missed_payment");
    assert.deepEqual({ ...sentEvent.missed_payment }, { amount_due: null, days_past_due: 0 });
    absent(sentEvent.balance_after);
    assert.equal(sentEvent.sealed_figures.schema_version, EVENT_SCHEMA_VERSION);
    const subject = c.subject("baitiao-cn", "c-1");
    assert.deepEqual(await open(sentEvent.sealed_figures, EVALUATE_EVENT_METHOD, "req-e1", subject, "event.sealed_figures"), {
      amount: money(100_000),
      days_past_due: 40,
      balance_after: money(250_000),
    });
    await assert.rejects(open(sentEvent.sealed_figures, ADJUST_LIMIT_METHOD, "req-e1", subject, "event.sealed_figures"));
  });

  it("sends a login without a balance with no sealed figures, and a purchase's kind empty but set", async () => {
    const sent: Sent[] = [];
    const c = client(sent);
    await c.evaluateEvent("t-a", "c-1", { event_id: "l", occurred_at: at, login: { new_device: true } });
    await c.evaluateEvent("t-a", "c-1", { event_id: "p", occurred_at: at, purchase: { amount: cny(9) } });
    const [login, purchase] = sent.map((s) => s.request.event);
    assert.equal(login.kind, "login");
    assert.equal(login.login.new_device, true);
    absent(login.sealed_figures);
    assert.equal(c.dataKeys.sealedKeys, 1, "only the purchase sealed a key");
    assert.equal(purchase.kind, "purchase");
    absent(purchase.purchase.amount);
    assert.equal(purchase.sealed_figures.fields.length, 1);
  });
});

describe("alerts and privacy on the wire", () => {
  it("UpdateAlertState, ExplainDecision, ExportSubject and EraseSubject", async () => {
    const sent: Sent[] = [];
    const c = client(sent);
    await c.updateAlertState("9007199254740993", "ALERT_STATE_RESOLVED", "PAYMENT_RECEIVED", { requestId: "r1" });
    await c.explainDecision("0b0e4a43-6f0b-4bd5-9a5e-0c3c5f0a1d2e", { requestId: "r2" });
    await c.exportSubject("t-a", "c-1", { requestId: "r3" });
    await c.eraseSubject("t-a", "c-1", { requestId: "r4" });
    const subject = c.subject("t-a", "c-1");
    assert.deepEqual(
      sent.map((s) => [s.service, s.method, { ...s.request }]),
      [
        ["AlertService", "UpdateAlertState", { request_id: "r1", alert_sequence: "9007199254740993", state: "ALERT_STATE_RESOLVED", reason_code: "PAYMENT_RECEIVED" }],
        ["PrivacyService", "ExplainDecision", { request_id: "r2", decision_id: "0b0e4a43-6f0b-4bd5-9a5e-0c3c5f0a1d2e" }],
        ["PrivacyService", "ExportSubject", { request_id: "r3", subject }],
        ["PrivacyService", "EraseSubject", { request_id: "r4", subject }],
      ],
    );
  });
});
