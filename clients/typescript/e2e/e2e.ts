// End to end against a real privscore server over mutual TLS, driven by tests/test_typescript.py:
// score twice (the second reusing the first one's data key), adjust a limit with features
// sealed for AdjustLimit, report an event, and send one Score the server refuses, printing what came back as one JSON document on stdout.
//
// Environment: PRIVSCORE_TARGET (host:port), PRIVSCORE_CA_FILE, PRIVSCORE_CERT_FILE,
// PRIVSCORE_KEY_FILE (PEM), PRIVSCORE_PUBLIC_KEYSET (the server's keys/public-keys.json),
// PRIVSCORE_PSEUDONYM_KEY_FILE (raw key bytes), PRIVSCORE_SCHEMA_VERSION, and
// PRIVSCORE_E2E_INPUT: a JSON file naming the calls (see Scenario).

import { readFileSync } from "node:fs";

import {
  PrivscoreClient,
  PrivscoreError,
  type AccountState,
  type BehaviourEvent,
  type Features,
} from "../src/index.js";

interface Scenario {
  tenant: string;
  customer_id: string;
  score: { request_id: string; features: Features };
  adjust_limit: { request_id: string; account: AccountState; features: Features };
  evaluate_event: { request_id: string; event: BehaviourEvent };
  refused_score: { request_id: string; features: Features };
}

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

async function main(): Promise<void> {
  const scenario = JSON.parse(readFileSync(env("PRIVSCORE_E2E_INPUT"), "utf8")) as Scenario;
  const client = PrivscoreClient.fromFiles({
    target: env("PRIVSCORE_TARGET"),
    caFile: env("PRIVSCORE_CA_FILE"),
    certFile: env("PRIVSCORE_CERT_FILE"),
    keyFile: env("PRIVSCORE_KEY_FILE"),
    publicKeysetFile: env("PRIVSCORE_PUBLIC_KEYSET"),
    pseudonymKeyFile: env("PRIVSCORE_PSEUDONYM_KEY_FILE"),
    schemaVersion: env("PRIVSCORE_SCHEMA_VERSION"),
  });
  try {
    const { tenant, customer_id: customer } = scenario;
    const score = await client.score(tenant, customer, scenario.score.features, {
      requestId: scenario.score.request_id,
    });
    // A second Score reuses the first one's sealed data key (one HPKE seal per method).
    const again = await client.score(tenant, customer, scenario.score.features);
    const limit = await client.adjustLimit(
      tenant,
      customer,
      scenario.adjust_limit.account,
      { features: scenario.adjust_limit.features },
      { requestId: scenario.adjust_limit.request_id },
    );
    const event = await client.evaluateEvent(tenant, customer, scenario.evaluate_event.event, {
      requestId: scenario.evaluate_event.request_id,
    });
    let refused: unknown = null;
    try {
      await client.score(tenant, customer, scenario.refused_score.features, {
        requestId: scenario.refused_score.request_id,
      });
    } catch (error) {
      if (!(error instanceof PrivscoreError)) throw error;
      refused = {
        code: error.codeName,
        reason: error.reason,
        domain: error.domain,
        field_violations: error.fieldViolations,
        request_id: error.requestId,
      };
    }
    const output = {
      identity: client.identity,
      subject: client.subject(tenant, customer),
      score: score,
      adjust_limit: limit,
      evaluate_event: event,
      refused_score: refused,
      score_again: again,
      sealed_keys: client.dataKeys.sealedKeys,
    };
    process.stdout.write(JSON.stringify(output) + "\n");
  } finally {
    client.close();
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exitCode = 1;
});
