// Sealing and opening against every committed envelope vector, positive and negative.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  DataKey,
  EnvelopeError,
  FIELD_AAD_LABEL,
  HPKE_SUITE,
  INFO_LABEL,
  SEALING_FORMAT,
  decodeFeatureValue,
  encodeFeatureValue,
  encodeGrant,
  fieldAad,
  fromHex,
  hpkeInfo,
  openFeatures,
  toHex,
  accountFigures,
  encodeFeatures,
  eventFigures,
  type AccountState,
  type BehaviourEvent,
  type FeatureInput,
  type Features,
  type MoneyInput,
  type OpenContext,
} from "../src/index.js";
import { envelope, featuresMessage, typed, type PositiveCase } from "./vectors.js";

const server = {
  keyId: envelope.server_key.key_id,
  publicKey: fromHex(envelope.server_key.public_key),
};

function context(
  method: string,
  identity: string,
  requestId: string,
  subject: { tenant: string; pseudonym: string },
  nowMs: number,
  path = "features",
): OpenContext {
  return {
    method,
    identity,
    requestId,
    subject,
    nowMs,
    path,
    servedSchemaVersion: envelope.keyring.served_schema_version,
    privateKeys: new Map([[envelope.server_key.key_id, fromHex(envelope.server_key.private_key)]]),
    retiredKeyIds: new Set(envelope.keyring.retired_key_ids),
  };
}

/** The data key, then every nonce in order: what the vector fixed. */
function fixedRandom(testCase: PositiveCase): (size: number) => Uint8Array {
  const draws = [
    fromHex(testCase.data_key.grant.data_key),
    ...testCase.messages.flatMap((m) => m.fields.map((f) => fromHex(f.nonce))),
  ];
  return (size) => {
    const next = draws.shift();
    assert.ok(next !== undefined && next.length === size, "an unexpected random draw");
    return next;
  };
}

describe("envelope vectors", () => {
  it("are sealing format 2 with the spec's labels", () => {
    assert.equal(envelope.format, SEALING_FORMAT);
    assert.equal(toHex(INFO_LABEL), envelope.labels.info);
    assert.equal(toHex(FIELD_AAD_LABEL), envelope.labels.field_aad);
  });

  it("derive the server key pair from ikm_r (RFC 9180 DeriveKeyPair)", async () => {
    const pair = await HPKE_SUITE.kem.deriveKeyPair(fromHex(envelope.server_key.ikm_r));
    assert.equal(toHex(await HPKE_SUITE.kem.serializePrivateKey(pair.privateKey)), envelope.server_key.private_key);
    assert.equal(toHex(await HPKE_SUITE.kem.serializePublicKey(pair.publicKey)), envelope.server_key.public_key);
  });
});

describe("sealing reproduces every positive vector byte for byte", () => {
  for (const testCase of envelope.cases) {
    it(testCase.name, async () => {
      const vector = testCase.data_key;
      const grant = vector.grant;
      assert.equal(toHex(hpkeInfo(testCase.method, testCase.identity)), vector.info);
      assert.equal(
        toHex(
          encodeGrant({
            dataKey: fromHex(grant.data_key),
            madeAtMs: grant.made_at_ms,
            maxAgeMs: grant.max_age_ms,
            maxRequests: grant.max_requests,
            maxBytes: grant.max_bytes,
          }),
        ),
        vector.grant_plaintext,
      );
      const ephemeral = await HPKE_SUITE.kem.deriveKeyPair(fromHex(vector.ikm_e));
      assert.equal(toHex(await HPKE_SUITE.kem.serializePrivateKey(ephemeral.privateKey)), vector.ephemeral_private_key);

      const key = await DataKey.create(
        server,
        testCase.method,
        testCase.identity,
        { maxAgeMs: grant.max_age_ms, maxRequests: grant.max_requests, maxBytes: grant.max_bytes },
        { madeAtMs: grant.made_at_ms, randomBytes: fixedRandom(testCase), ikmE: fromHex(vector.ikm_e) },
      );
      assert.equal(key.sealed.key_id, vector.key_id);
      assert.equal(toHex(key.sealed.encapsulated_key), vector.encapsulated_key);
      assert.equal(toHex(key.sealed.sealed_key), vector.sealed_key);

      for (const message of testCase.messages) {
        const plaintexts = message.fields.map((f) => {
          const plaintext = encodeFeatureValue(typed(f.value));
          assert.equal(toHex(plaintext), f.plaintext, `${f.name} plaintext`);
          assert.equal(
            toHex(fieldAad(message.schema_version, message.request_id, message.subject, f.name)),
            f.aad,
            `${f.name} aad`,
          );
          return [f.name, plaintext] as const;
        });
        const sealed = key.sealEncoded(message.schema_version, message.subject, plaintexts, message.request_id);
        assert.equal(sealed.schema_version, message.features.schema_version);
        assert.deepEqual(
          sealed.fields.map((f) => ({ name: f.name, key_id: f.key_id, nonce: toHex(f.nonce), ciphertext: toHex(f.ciphertext) })),
          message.features.fields,
        );
      }
    });
  }
});

describe("opening gives every positive vector's values", () => {
  for (const testCase of envelope.cases) {
    it(testCase.name, async () => {
      for (const message of testCase.messages) {
        const opened = await openFeatures(
          featuresMessage(message.features),
          context(testCase.method, testCase.identity, message.request_id, message.subject, testCase.now_ms, message.path),
        );
        const expected = Object.fromEntries(Object.entries(message.opened).map(([name, v]) => [name, typed(v)]));
        assert.deepEqual(opened, expected);
      }
    });
  }
});

describe("opening refuses every negative vector as stated", () => {
  for (const vector of envelope.negative) {
    it(vector.name, async () => {
      const c = vector.context;
      await assert.rejects(
        openFeatures(featuresMessage(vector.features), context(c.method, c.identity, c.request_id, c.subject, c.now_ms, c.path)),
        (error: unknown) => {
          assert.ok(error instanceof EnvelopeError, String(error));
          assert.deepEqual(
            {
              code: error.code,
              reason: error.reason,
              violations: error.violations.map(({ field, reason }) => ({ field, reason })),
            },
            vector.expect,
          );
          return true;
        },
      );
    });
  }
});

describe("account state and event figures in clear give the sealed vectors' plaintexts", () => {
  const money = (value: FeatureInput) => value as MoneyInput;
  for (const testCase of envelope.cases) {
    for (const message of testCase.messages) {
      const values = Object.fromEntries(message.fields.map((f) => [f.name, typed(f.value)]));
      let figures: Features;
      if (message.path === "sealed_account") {
        figures = accountFigures(values as unknown as AccountState);
      } else if (message.path === "event.sealed_figures" && testCase.name === "evaluate-event-sealed-figures") {
        const event: BehaviourEvent = {
          event_id: "evt",
          occurred_at: { seconds: 0 },
          missed_payment: { amount_due: money(values.amount!), days_past_due: values.days_past_due as number },
          balance_after: money(values.balance_after!),
        };
        figures = eventFigures(event).figures;
      } else {
        continue;
      }
      it(`${testCase.name}: ${message.path}`, () => {
        assert.deepEqual(
          encodeFeatures(figures).map(([name, plaintext]) => [name, toHex(plaintext)]),
          message.fields.map((f) => [f.name, f.plaintext]),
        );
      });
    }
  }
});

describe("FeatureValue", () => {
  it("round-trips every kind, defaults included", () => {
    for (const value of [0, -0.5, 24, 1e300, "", "A11", "Zürich-北京", true, false]) {
      assert.equal(decodeFeatureValue(encodeFeatureValue(value)), value);
    }
    for (const value of [
      { currency_code: "CNY", minor_units: 0n },
      { currency_code: "", minor_units: -1n },
      { currency_code: "USD", minor_units: 2n ** 53n + 1n },
    ]) {
      assert.deepEqual(decodeFeatureValue(encodeFeatureValue(value)), value);
    }
  });

  it("refuses what is no FeatureValue", () => {
    assert.equal(decodeFeatureValue(new Uint8Array()), null);
    assert.equal(decodeFeatureValue(Uint8Array.of(0x20, 0x01)), null);
    assert.equal(decodeFeatureValue(Uint8Array.of(0x09, 0x00)), null);
    assert.equal(decodeFeatureValue(Uint8Array.of(0x12, 0x01, 0xff)), null);
  });
});
