// End to end against a real privscore server over mutual TLS, driven by tests/test_typescript.py.
// The client learns the sealing key and schema version from the server (DiscoveryService);
// only the caller's own secrets are files. Then it scores twice (the second reusing the first
// one's data key), adjusts a limit with features sealed for AdjustLimit, reports an event, and
// sends one Score the server refuses, printing what came back as one JSON document on stdout.
// With `pinned` in the scenario it instead tries each pinned key, expecting the client to
// refuse it before any call (it would Score if it did not).
//
// Environment: PRIVSCORE_TARGET (host:port), PRIVSCORE_CA_FILE, PRIVSCORE_CERT_FILE,
// PRIVSCORE_KEY_FILE (PEM), PRIVSCORE_PSEUDONYM_KEY_FILE (raw key bytes), and
// PRIVSCORE_E2E_INPUT: a JSON file naming the calls (see Scenario).

import { readFileSync } from "node:fs";

import {
  DiscoveryRefused,
  PrivscoreClient,
  PrivscoreError,
  type AccountState,
  type BehaviourEvent,
  type FileOptions,
  type Features,
  type ServerPublicKey,
} from "../src/index.js";

interface Scenario {
  tenant: string;
  customer_id: string;
  score: { request_id: string; features: Features };
  adjust_limit: { request_id: string; account: AccountState; features: Features };
  evaluate_event: { request_id: string; event: BehaviourEvent };
  refused_score: { request_id: string; features: Features };
  /** Keys to pin (id, base64 of the raw 32 bytes), each of which the server must not list. */
  pinned?: { key_id: string; public_key: string }[];
}

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

function fileOptions(): FileOptions {
  return {
    target: env("PRIVSCORE_TARGET"),
    caFile: env("PRIVSCORE_CA_FILE"),
    certFile: env("PRIVSCORE_CERT_FILE"),
    keyFile: env("PRIVSCORE_KEY_FILE"),
    pseudonymKeyFile: env("PRIVSCORE_PSEUDONYM_KEY_FILE"),
  };
}

/** Each pinned key: refused (DiscoveryRefused, no call made), or, wrongly accepted, one Score. */
async function tryPinned(scenario: Scenario): Promise<unknown[]> {
  const outcomes: unknown[] = [];
  for (const [i, key] of (scenario.pinned ?? []).entries()) {
    const pinned: ServerPublicKey = {
      keyId: key.key_id,
      publicKey: new Uint8Array(Buffer.from(key.public_key, "base64")),
    };
    let client: PrivscoreClient;
    try {
      client = await PrivscoreClient.fromFiles({ ...fileOptions(), pinned });
    } catch (error) {
      if (!(error instanceof DiscoveryRefused)) throw error;
      outcomes.push({ refused: true, error: error.name, message: error.message });
      continue;
    }
    try {
      const requestId = `${scenario.score.request_id}-pinned-${i}`;
      await client.score(scenario.tenant, scenario.customer_id, scenario.score.features, {
        requestId,
      });
      outcomes.push({ refused: false, request_id: requestId });
    } finally {
      client.close();
    }
  }
  return outcomes;
}

async function main(): Promise<void> {
  const scenario = JSON.parse(readFileSync(env("PRIVSCORE_E2E_INPUT"), "utf8")) as Scenario;
  if (scenario.pinned !== undefined) {
    process.stdout.write(JSON.stringify({ pinned: await tryPinned(scenario) }) + "\n");
    return;
  }
  const client = await PrivscoreClient.fromFiles(fileOptions());
  try {
    const info = client.serverInfo!;
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
      discovered: {
        sealing_format: info.sealing_format,
        schema_version: info.schema_version,
        model_version: info.model_version,
        policy_version: info.policy_version,
        model_manifest_sha256: info.model_manifest_sha256,
        sealing_keys: info.sealing_keys.map((key) => ({
          key_id: key.key_id,
          public_key: Buffer.from(key.public_key).toString("base64"),
          status: key.status,
        })),
        features: info.features.map((feature) => feature.name),
      },
      schema_version: client.schemaVersion,
      sealed_to: client.dataKeys.server.keyId,
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
