// End to end against a real privscore server over mutual TLS, driven by tests/test_typescript.py.
// The client learns the sealing key and schema version from the server (DiscoveryService);
// only the caller's own secrets are files. Then it scores twice (the second reusing the first
// one's data key) and closes the loop with the account state and event figures sealed: it
// adjusts a limit with features scored in the call (sealed with the account under one data
// key), on the score the server recorded and on a stated one; reports a missed payment (its
// figures sealed) and a login (none); adjusts the limit the alert freezes; acknowledges and
// resolves that alert; adjusts again; makes calls the server refuses (a Score, an
// AdjustLimit for a subject never scored, resolving a resolved alert); has decisions
// explained; and exports and erases another customer, whose data is then gone. It prints
// what came back as one JSON document on stdout. With `pinned` in the scenario it instead tries each
// pinned key, expecting the client to refuse it before any call (it would Score if it did
// not).
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
  type ExportSubjectResponse,
  type FileOptions,
  type Features,
  type ServerPublicKey,
  subjectDocument,
} from "../src/index.js";

interface Scenario {
  tenant: string;
  customer_id: string;
  /** A customer never scored: AdjustLimit on the recorded score is refused for them. */
  unscored_customer_id: string;
  score: { request_id: string; features: Features };
  /** Features scored in the call, sealed with the account under one data key. */
  adjust_limit: { request_id: string; account: AccountState; features: Features };
  /** On the subject's latest Score decision, as the server recorded it. */
  adjust_limit_recorded: { request_id: string; account: AccountState };
  /** On a score the caller states (the dev identity may). */
  adjust_limit_stated: { request_id: string; account: AccountState; latest_score: number };
  /** Raises an alert that freezes the limit until resolved. */
  evaluate_event: { request_id: string; event: BehaviourEvent };
  /** A login without a balance: no sealed figures. */
  login_event: { request_id: string; event: BehaviourEvent };
  /** On the recorded score again, with the alert open, then after it is resolved. */
  adjust_limit_alerted: { request_id: string; account: AccountState };
  acknowledge_alert: { request_id: string; reason_code: string };
  resolve_alert: { request_id: string; reason_code: string };
  adjust_limit_resolved: { request_id: string; account: AccountState };
  refused_score: { request_id: string; features: Features };
  refused_adjust_limit: { request_id: string; account: AccountState };
  refused_resolve: { request_id: string; reason_code: string };
  /** ExplainDecision of the first Score, of the frozen limit, and of an alert change (refused). */
  explain: { score: string; limit: string; refused: string };
  /** Another customer: scored, a limit, a purchase; exported, erased, then gone. */
  erasure: {
    customer_id: string;
    request_ids: Record<
      | "score"
      | "adjust_limit"
      | "event"
      | "export"
      | "erase"
      | "adjust_limit_after"
      | "explain_after"
      | "export_after"
      | "erase_again",
      string
    >;
    account: AccountState;
    event: BehaviourEvent;
  };
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

/** What a refused call said: code, ErrorInfo, field violations, request id. */
async function refusal(call: Promise<unknown>): Promise<unknown> {
  try {
    await call;
  } catch (error) {
    if (!(error instanceof PrivscoreError)) throw error;
    return {
      code: error.codeName,
      reason: error.reason,
      domain: error.domain,
      field_violations: error.fieldViolations,
      request_id: error.requestId,
    };
  }
  return null;
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
    const id = (step: { request_id: string }) => ({ requestId: step.request_id });
    const score = await client.score(tenant, customer, scenario.score.features, id(scenario.score));
    // A second Score reuses the first one's sealed data key (one HPKE seal per method).
    const again = await client.score(tenant, customer, scenario.score.features);
    const limit = await client.adjustLimit(
      tenant,
      customer,
      scenario.adjust_limit.account,
      { features: scenario.adjust_limit.features },
      id(scenario.adjust_limit),
    );
    const recorded = await client.adjustLimit(
      tenant,
      customer,
      scenario.adjust_limit_recorded.account,
      {},
      id(scenario.adjust_limit_recorded),
    );
    const stated = await client.adjustLimit(
      tenant,
      customer,
      scenario.adjust_limit_stated.account,
      { latestScore: scenario.adjust_limit_stated.latest_score },
      id(scenario.adjust_limit_stated),
    );
    const adjustKeys = client.dataKeys.sealedKeys;
    const event = await client.evaluateEvent(
      tenant,
      customer,
      scenario.evaluate_event.event,
      id(scenario.evaluate_event),
    );
    const login = await client.evaluateEvent(
      tenant,
      customer,
      scenario.login_event.event,
      id(scenario.login_event),
    );
    const alerted = await client.adjustLimit(
      tenant,
      customer,
      scenario.adjust_limit_alerted.account,
      {},
      id(scenario.adjust_limit_alerted),
    );
    const alertSequence = event.response.alerts[0]?.alert_sequence;
    if (alertSequence === undefined) throw new Error("the event raised no alert");
    const acknowledged = await client.updateAlertState(
      alertSequence,
      "ALERT_STATE_ACKNOWLEDGED",
      scenario.acknowledge_alert.reason_code,
      id(scenario.acknowledge_alert),
    );
    const resolved = await client.updateAlertState(
      alertSequence,
      "ALERT_STATE_RESOLVED",
      scenario.resolve_alert.reason_code,
      id(scenario.resolve_alert),
    );
    const afterResolve = await client.adjustLimit(
      tenant,
      customer,
      scenario.adjust_limit_resolved.account,
      {},
      id(scenario.adjust_limit_resolved),
    );
    const refused = await refusal(
      client.score(tenant, customer, scenario.refused_score.features, id(scenario.refused_score)),
    );
    const refusedLimit = await refusal(
      client.adjustLimit(
        tenant,
        scenario.unscored_customer_id,
        scenario.refused_adjust_limit.account,
        {},
        id(scenario.refused_adjust_limit),
      ),
    );
    const refusedResolve = await refusal(
      client.updateAlertState(
        alertSequence,
        "ALERT_STATE_RESOLVED",
        scenario.refused_resolve.reason_code,
        id(scenario.refused_resolve),
      ),
    );
    const sealedKeys = client.dataKeys.sealedKeys;

    // The PrivacyService: explanations, then another customer exported and erased.
    const explainScore = await client.explainDecision(score.response.metadata.decision_id, {
      requestId: scenario.explain.score,
    });
    const explainLimit = await client.explainDecision(alerted.response.metadata.decision_id, {
      requestId: scenario.explain.limit,
    });
    const refusedExplain = await refusal(
      client.explainDecision(resolved.response.metadata.decision_id, {
        requestId: scenario.explain.refused,
      }),
    );
    const erasure = scenario.erasure;
    const ids = erasure.request_ids;
    const gone = erasure.customer_id;
    const goneScore = await client.score(tenant, gone, scenario.score.features, {
      requestId: ids.score,
    });
    const goneLimit = await client.adjustLimit(tenant, gone, erasure.account, {}, {
      requestId: ids.adjust_limit,
    });
    const goneEvent = await client.evaluateEvent(tenant, gone, erasure.event, {
      requestId: ids.event,
    });
    const exported = await client.exportSubject(tenant, gone, { requestId: ids.export });
    const erased = await client.eraseSubject(tenant, gone, { requestId: ids.erase });
    const afterErasure = {
      adjust_limit: await refusal(
        client.adjustLimit(tenant, gone, erasure.account, {}, { requestId: ids.adjust_limit_after }),
      ),
      explain: await refusal(
        client.explainDecision(goneScore.response.metadata.decision_id, {
          requestId: ids.explain_after,
        }),
      ),
      export: await client.exportSubject(tenant, gone, { requestId: ids.export_after }),
      erase: await client.eraseSubject(tenant, gone, { requestId: ids.erase_again }),
    };
    const document = (reply: { response: ExportSubjectResponse; requestId: string | undefined }) => ({
      requestId: reply.requestId,
      metadata: reply.response.metadata,
      document: subjectDocument(reply.response),
    });

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
      unscored_subject: client.subject(tenant, scenario.unscored_customer_id),
      score,
      score_again: again,
      adjust_limit: limit,
      adjust_limit_recorded: recorded,
      adjust_limit_stated: stated,
      evaluate_event: event,
      login_event: login,
      adjust_limit_alerted: alerted,
      acknowledge_alert: acknowledged,
      resolve_alert: resolved,
      adjust_limit_resolved: afterResolve,
      refused_score: refused,
      refused_adjust_limit: refusedLimit,
      refused_resolve: refusedResolve,
      explain_score: explainScore,
      explain_limit: explainLimit,
      refused_explain: refusedExplain,
      erasure: {
        subject: client.subject(tenant, gone),
        score: goneScore,
        adjust_limit: goneLimit,
        evaluate_event: goneEvent,
        export: document(exported),
        erase: erased,
        after: { ...afterErasure, export: document(afterErasure.export) },
      },
      // Score's key, then one AdjustLimit key (account and features under it, reused by the
      // next two AdjustLimits)
      sealed_keys_after_adjust_limits: adjustKeys,
      sealed_keys: sealedKeys,
      // The refused Score and AdjustLimit retired their keys: the erased customer's Score and
      // AdjustLimit each sealed a new one.
      sealed_keys_at_the_end: client.dataKeys.sealedKeys,
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
