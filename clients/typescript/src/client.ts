// The privscore client: learns the server's sealing key and schema version over the wire
// (DiscoveryService), pseudonymises customer ids, seals features, account state and event
// figures under reused data keys (sealing format 2) and calls Score, AdjustLimit,
// EvaluateEvent, UpdateAlertState and the PrivacyService over mutual TLS, reading each call's
// request id from its trailers and a failure's rich error details.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import { schemaVersionOf, sealingKey, type ServerInfo } from "./discovery.js";
import { PrivscoreError, REQUEST_ID_TRAILER, requestIdOf } from "./errors.js";
import type { Features } from "./featureValue.js";
import {
  ACCOUNT_SCHEMA_VERSION,
  EVENT_SCHEMA_VERSION,
  accountFigures,
  eventFigures,
  type AccountState,
  type BehaviourEvent,
} from "./figures.js";
import { certificateIdentity } from "./keys.js";
import { SERVICE_PROTO_FILES, defaultProtoRoot, vendoredProtoDir } from "./protos.js";
import { Pseudonymiser } from "./pseudonym.js";
import {
  ADJUST_LIMIT_METHOD,
  DEFAULT_KEY_LIMITS,
  DataKey,
  DataKeyCache,
  EVALUATE_EVENT_METHOD,
  SCORE_METHOD,
  encodeFeatures,
  plaintextBytes,
  type EncryptedFeaturesMessage,
  type KeyLimits,
  type ServerPublicKey,
  type Subject,
} from "./sealing.js";

export const DEFAULT_TIMEOUT_MS = 10_000;
/** The request ids the server takes from the `x-request-id` header (and from messages). */
export const REQUEST_ID_PATTERN = /^[A-Za-z0-9._:-]{1,64}$/;

// -- messages, as @grpc/proto-loader gives them (keepCase, enums and 64-bit ints as strings) --

export interface Money {
  currency_code: string;
  minor_units: string;
}
export interface Timestamp {
  seconds: string;
  nanos: number;
}
export interface Reason {
  code: string;
  text: string;
}
export interface DecisionMetadata {
  decision_id: string;
  model_version: string;
  policy_version: string;
  audit_sequence: string;
  decided_at: Timestamp | null;
  request_id: string;
}
export interface CreditScore {
  probability_of_default: number;
  score: number;
  grade: string;
  decision: string;
  reasons: Reason[];
}
export interface ScoreResponse {
  metadata: DecisionMetadata;
  score: CreditScore;
}
export interface AdjustLimitResponse {
  metadata: DecisionMetadata;
  previous_limit: Money;
  new_limit: Money;
  action: string;
  rule: string;
  reasons: Reason[];
  score: number;
  replayed: boolean;
  /** SCORE_SOURCE_RECORDED, SCORE_SOURCE_IN_CALL or SCORE_SOURCE_CALLER_STATED. */
  score_source: string;
  /** For a recorded score, the Score decision it came from. */
  score_decision_id: string;
  /** Alert.alert_sequence of each unresolved alert that froze or held the limit. */
  blocking_alerts: string[];
}
export interface Alert {
  sequence: string;
  subject: Subject;
  rule: string;
  severity: string;
  recommended_action: string;
  reasons: Reason[];
  event_id: string;
  metadata: DecisionMetadata;
  /** ALERT_STATE_OPEN, ALERT_STATE_ACKNOWLEDGED or ALERT_STATE_RESOLVED. */
  state: string;
  /** The alert's id: the stream sequence it was raised at. */
  alert_sequence: string;
  state_reason: string;
}
export interface EvaluateEventResponse {
  metadata: DecisionMetadata;
  alerts: Alert[];
  duplicate: boolean;
}
/** The states a caller may move an alert to. */
export type AlertStateChange = "ALERT_STATE_ACKNOWLEDGED" | "ALERT_STATE_RESOLVED";
export interface UpdateAlertStateResponse {
  alert: Alert;
  metadata: DecisionMetadata;
}
export interface Counterfactual {
  feature: string;
  text: string;
  reaches: string;
  score: number;
}
export interface Explanation {
  language: string;
  outcome: string;
  score: number;
  score_min: number;
  score_max: number;
  reasons: Reason[];
  decided_at: Timestamp | null;
  model_version: string;
  contest: string;
  counterfactuals: Counterfactual[];
  text: string;
}
export interface ExplainDecisionResponse {
  metadata: DecisionMetadata;
  decision_id: string;
  catalogue_version: string;
  explanations: Explanation[];
}
export interface ExportSubjectResponse {
  metadata: DecisionMetadata;
  /** UTF-8 JSON (docs/subject-export.md); `subjectDocument` parses it. */
  document: Buffer;
}
export interface EraseSubjectResponse {
  metadata: DecisionMetadata;
  erased: boolean;
  events_deleted: number;
  alerts_deleted: number;
  adjustments_deleted: number;
}

/** An ExportSubject reply's document, parsed. */
export function subjectDocument(response: ExportSubjectResponse): unknown {
  return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(response.document));
}

/** A reply and the request id the server sent in its trailers. */
export interface Reply<T> {
  response: T;
  requestId: string | undefined;
}

export interface CallOptions {
  /** 1-64 characters of [A-Za-z0-9._:-]; default a fresh random id. */
  requestId?: string;
  timeoutMs?: number;
}

export interface ConnectionOptions {
  /** host:port of the server. */
  target: string;
  /** PEM: the CA that signed the server's certificate, this client's certificate and key. */
  tls: { ca: Buffer; cert: Buffer; key: Buffer };
  /** The directory holding privscore/v1/*.proto; default the repository's protos/. */
  protoRoot?: string;
  channelOptions?: grpc.ChannelOptions;
}

export interface ClientOptions extends ConnectionOptions {
  /** The server key to seal data keys to (see `PrivscoreClient.discovered` to ask the server). */
  serverKey: ServerPublicKey;
  pseudonymiser: Pseudonymiser;
  /** The served model's feature schema version. */
  schemaVersion: string;
  /** The SPIFFE id of the client certificate; read from `tls.cert` when not given. */
  identity?: string;
  /** Data-key reuse limits (DEFAULT_KEY_LIMITS; any 0 seals a key per request). */
  keyLimits?: KeyLimits;
  /** What the server said when the key and schema version came from it. */
  serverInfo?: ServerInfo;
}

export interface DiscoveredOptions extends ConnectionOptions {
  pseudonymiser: Pseudonymiser;
  /** A key the caller trusts already (key id and raw 32-byte X25519 public key): the server
   * must list it, and it is the one sealed to. Without it, the server's primary key is. */
  pinned?: ServerPublicKey;
  identity?: string;
  keyLimits?: KeyLimits;
  /** The GetServerInfo deadline; default DEFAULT_TIMEOUT_MS. */
  discoveryTimeoutMs?: number;
}

/** Only the caller's own secrets come from files; the server's key and schema come from it. */
export interface FileOptions {
  target: string;
  caFile: string;
  certFile: string;
  keyFile: string;
  pseudonymKeyFile: string;
  pinned?: ServerPublicKey;
  keyLimits?: KeyLimits;
  protoRoot?: string;
  channelOptions?: grpc.ChannelOptions;
  discoveryTimeoutMs?: number;
}

/** One mutual-TLS channel and the service stubs sharing it (one per service). Closing any
 * stub closes the channel, so close the connection, not its stubs. */
export interface Connection {
  readonly channel: grpc.Channel;
  client(name: string): grpc.Client;
  close(): void;
}

type UnaryMethod = (
  request: unknown,
  metadata: grpc.Metadata,
  options: grpc.CallOptions,
  callback: (error: grpc.ServiceError | null, response?: unknown) => void,
) => grpc.ClientUnaryCall;

export function newRequestId(): string {
  return randomUUID().replaceAll("-", "");
}

export function loadServices(protoRoot: string = defaultProtoRoot()): grpc.GrpcObject {
  const definition = protoLoader.loadSync(SERVICE_PROTO_FILES, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [protoRoot, vendoredProtoDir()],
  });
  return grpc.loadPackageDefinition(definition);
}

function serviceConstructor(root: grpc.GrpcObject, name: string): grpc.ServiceClientConstructor {
  const v1 = (root.privscore as grpc.GrpcObject).v1 as grpc.GrpcObject;
  return v1[name] as grpc.ServiceClientConstructor;
}

export function openConnection(options: ConnectionOptions): Connection {
  const credentials = grpc.credentials.createSsl(options.tls.ca, options.tls.key, options.tls.cert);
  const channel = new grpc.Channel(options.target, credentials, options.channelOptions ?? {});
  const services = loadServices(options.protoRoot);
  const stubs = new Map<string, grpc.Client>();
  return {
    channel,
    client(name) {
      let stub = stubs.get(name);
      if (stub === undefined) {
        stub = new (serviceConstructor(services, name))(options.target, credentials, {
          channelOverride: channel,
        });
        stubs.set(name, stub);
      }
      return stub;
    },
    close: () => channel.close(),
  };
}

/** The call's metadata: the request id as the `x-request-id` header when the server would take
 * it (REQUEST_ID_PATTERN), so its trailer, logs and audit record carry the message's id. */
export function requestIdMetadata(requestId: string | undefined): grpc.Metadata {
  const metadata = new grpc.Metadata();
  if (requestId !== undefined && REQUEST_ID_PATTERN.test(requestId)) {
    metadata.set(REQUEST_ID_TRAILER, requestId);
  }
  return metadata;
}

function identityOf(options: { identity?: string; tls: { cert: Buffer } }): string {
  const identity = options.identity ?? certificateIdentity(options.tls.cert);
  if (!identity) {
    throw new Error("the client certificate has no single spiffe:// URI SAN: no identity");
  }
  return identity;
}

/** One unary call; resolves once the trailers (with the request id) are in, rejects with a
 * PrivscoreError. */
function unary<T>(
  client: grpc.Client,
  method: string,
  request: object,
  metadata: grpc.Metadata,
  timeoutMs: number | undefined,
): Promise<Reply<T>> {
  const rpc = (client as unknown as Record<string, UnaryMethod>)[method]!.bind(client);
  const deadline = Date.now() + (timeoutMs ?? DEFAULT_TIMEOUT_MS);
  return new Promise((resolve, reject) => {
    let response: unknown;
    const call = rpc(request, metadata, { deadline }, (_error, reply) => {
      response = reply;
    });
    call.on("status", (status: grpc.StatusObject) => {
      if (status.code === grpc.status.OK && response !== undefined) {
        resolve({ response: response as T, requestId: requestIdOf(status.metadata) });
      } else {
        reject(new PrivscoreError(status));
      }
    });
  });
}

export class PrivscoreClient {
  readonly schemaVersion: string;
  readonly identity: string;
  readonly dataKeys: DataKeyCache;
  /** What GetServerInfo said, when the client was made from it (`discovered`, `fromFiles`). */
  readonly serverInfo: ServerInfo | undefined;
  readonly #pseudonymiser: Pseudonymiser;
  readonly #connection: Connection;
  readonly #scoring: grpc.Client;
  readonly #limits: grpc.Client;
  readonly #alerts: grpc.Client;
  readonly #privacy: grpc.Client;

  /** A client sealing to `options.serverKey` for `options.schemaVersion`, both given by the
   * caller. `connection`: an open one to use (and close with this client). */
  constructor(options: ClientOptions, connection?: Connection) {
    this.identity = identityOf(options);
    this.schemaVersion = options.schemaVersion;
    this.serverInfo = options.serverInfo;
    this.#pseudonymiser = options.pseudonymiser;
    this.dataKeys = new DataKeyCache(
      options.serverKey,
      this.identity,
      options.keyLimits ?? { ...DEFAULT_KEY_LIMITS },
    );
    this.#connection = connection ?? openConnection(options);
    this.#scoring = this.#connection.client("ScoringService");
    this.#limits = this.#connection.client("LimitService");
    this.#alerts = this.#connection.client("AlertService");
    this.#privacy = this.#connection.client("PrivacyService");
  }

  /**
   * A client sealing to the key and schema version the server names over the wire
   * (DiscoveryService.GetServerInfo), on the same channel: only the caller's own secrets are
   * local. With `pinned`, the server must list that key (same id, same bytes) and it is the
   * one sealed to; else the server's single primary key is (trust on first use). Rejects with
   * DiscoveryRefused, having made no other call, when the pinned key is not listed, no single
   * primary is, or the server opens another sealing format.
   */
  static async discovered(options: DiscoveredOptions): Promise<PrivscoreClient> {
    const identity = identityOf(options);
    const connection = openConnection(options);
    try {
      const info = await getServerInfo(connection, options.discoveryTimeoutMs);
      const serverKey = sealingKey(info, options.pinned);
      const schemaVersion = schemaVersionOf(info);
      return new PrivscoreClient(
        { ...options, identity, serverKey, schemaVersion, serverInfo: info },
        connection,
      );
    } catch (error) {
      connection.close();
      throw error;
    }
  }

  /** `discovered`, with the caller's own secrets read from files: the CA, the client
   * certificate and key (PEM) and the pseudonym key (raw bytes). */
  static async fromFiles(options: FileOptions): Promise<PrivscoreClient> {
    const { caFile, certFile, keyFile, pseudonymKeyFile, ...rest } = options;
    return PrivscoreClient.discovered({
      ...rest,
      tls: { ca: readFileSync(caFile), cert: readFileSync(certFile), key: readFileSync(keyFile) },
      pseudonymiser: Pseudonymiser.fromFile(pseudonymKeyFile),
    });
  }

  /** What the server says now (keys, sealing format, schema, versions): to notice a key
   * rotation or a new model, after which make a new client. */
  getServerInfo(timeoutMs?: number): Promise<ServerInfo> {
    return getServerInfo(this.#connection, timeoutMs);
  }

  subject(tenant: string, customerId: string): Subject {
    return { tenant, pseudonym: this.#pseudonymiser.pseudonym(tenant, customerId) };
  }

  /** One request's values (features by default; account state or event figures under their
   * own schema version) sealed under the method's current data key. */
  async seal(
    method: string,
    requestId: string,
    subject: Subject,
    features: Features,
    schemaVersion: string = this.schemaVersion,
  ): Promise<{ sealed: EncryptedFeaturesMessage; key: DataKey }> {
    const sets = [[schemaVersion, features]] as const;
    const [sealed, key] = await this.#sealAll(method, requestId, subject, sets);
    return { sealed: sealed[0]!, key };
  }

  /** Several sets of values of one request sealed under ONE data key of the method, which is
   * charged once: one request, every set's plaintext bytes and fields. */
  async #sealAll(
    method: string,
    requestId: string,
    subject: Subject,
    sets: ReadonlyArray<readonly [string, Features]>,
  ): Promise<[EncryptedFeaturesMessage[], DataKey]> {
    const encoded = sets.map(([version, values]) => [version, encodeFeatures(values)] as const);
    const bytes = encoded.reduce((n, [, plaintexts]) => n + plaintextBytes(plaintexts), 0);
    const fields = encoded.reduce((n, [, plaintexts]) => n + plaintexts.length, 0);
    const key = await this.dataKeys.take(method, bytes, fields);
    const sealed = encoded.map(([version, plaintexts]) =>
      key.sealEncoded(version, subject, plaintexts, requestId),
    );
    return [sealed, key];
  }

  async score(
    tenant: string,
    customerId: string,
    features: Features,
    options: CallOptions = {},
  ): Promise<Reply<ScoreResponse>> {
    const requestId = options.requestId ?? newRequestId();
    const subject = this.subject(tenant, customerId);
    const { sealed, key } = await this.seal(SCORE_METHOD, requestId, subject, features);
    const request = { request_id: requestId, subject, features: sealed };
    return this.#call<ScoreResponse>(this.#scoring, "Score", request, options.timeoutMs, key);
  }

  /**
   * A limit decision. The account state is sealed ("account/1", for AdjustLimit); the score
   * is, by `source`: absent or `{}`, the subject's latest Score decision the server recorded;
   * `{ features }`, features scored in this call, sealed under the same data key as the
   * account; `{ latestScore }`, a score the caller states (only a role allowed to state
   * scores may). At most one of the two.
   */
  async adjustLimit(
    tenant: string,
    customerId: string,
    account: AccountState,
    source: { latestScore?: number; features?: Features } = {},
    options: CallOptions = {},
  ): Promise<Reply<AdjustLimitResponse>> {
    const { latestScore, features } = source;
    if (latestScore !== undefined && features !== undefined) {
      throw new TypeError("give at most one of latestScore and features");
    }
    const requestId = options.requestId ?? newRequestId();
    const subject = this.subject(tenant, customerId);
    const sets: Array<[string, Features]> = [[ACCOUNT_SCHEMA_VERSION, accountFigures(account)]];
    if (features !== undefined) sets.push([this.schemaVersion, features]);
    const [sealed, key] = await this.#sealAll(ADJUST_LIMIT_METHOD, requestId, subject, sets);
    const request: Record<string, unknown> & { request_id: string } = {
      request_id: requestId,
      subject,
      sealed_account: sealed[0],
    };
    if (features !== undefined) request.features = sealed[1];
    if (latestScore !== undefined) request.latest_score = latestScore;
    const timeoutMs = options.timeoutMs;
    return this.#call<AdjustLimitResponse>(this.#limits, "AdjustLimit", request, timeoutMs, key);
  }

  /** Report one behaviour event; its figures are sealed ("event/1", for EvaluateEvent). A
   * login without a balance has none and is sent without sealed_figures. */
  async evaluateEvent(
    tenant: string,
    customerId: string,
    event: BehaviourEvent,
    options: CallOptions = {},
  ): Promise<Reply<EvaluateEventResponse>> {
    const requestId = options.requestId ?? newRequestId();
    const subject = this.subject(tenant, customerId);
    const { clear, figures } = eventFigures(event);
    const timeoutMs = options.timeoutMs;
    if (Object.keys(figures).length === 0) {
      const request = { request_id: requestId, subject, event: clear };
      return this.#call<EvaluateEventResponse>(this.#alerts, "EvaluateEvent", request, timeoutMs);
    }
    const { sealed, key } = await this.seal(
      EVALUATE_EVENT_METHOD,
      requestId,
      subject,
      figures,
      EVENT_SCHEMA_VERSION,
    );
    const request = { request_id: requestId, subject, event: { ...clear, sealed_figures: sealed } };
    return this.#call<EvaluateEventResponse>(this.#alerts, "EvaluateEvent", request, timeoutMs, key);
  }

  /** Acknowledge or resolve an alert (by Alert.alert_sequence) with an upper-snake-case
   * reason code such as "PAYMENT_RECEIVED"; a resolved alert stops acting on the limit. */
  updateAlertState(
    alertSequence: number | bigint | string,
    state: AlertStateChange,
    reasonCode: string,
    options: CallOptions = {},
  ): Promise<Reply<UpdateAlertStateResponse>> {
    const request = {
      request_id: options.requestId ?? newRequestId(),
      alert_sequence: String(alertSequence),
      state,
      reason_code: reasonCode,
    };
    return this.#call(this.#alerts, "UpdateAlertState", request, options.timeoutMs);
  }

  /** One decision explained (zh-CN, then en), by its DecisionMetadata.decision_id. */
  explainDecision(
    decisionId: string,
    options: CallOptions = {},
  ): Promise<Reply<ExplainDecisionResponse>> {
    const request = { request_id: options.requestId ?? newRequestId(), decision_id: decisionId };
    return this.#call(this.#privacy, "ExplainDecision", request, options.timeoutMs);
  }

  /** Everything the server keeps about one customer, as one JSON document (`subjectDocument`). */
  exportSubject(
    tenant: string,
    customerId: string,
    options: CallOptions = {},
  ): Promise<Reply<ExportSubjectResponse>> {
    const request = {
      request_id: options.requestId ?? newRequestId(),
      subject: this.subject(tenant, customerId),
    };
    return this.#call(this.#privacy, "ExportSubject", request, options.timeoutMs);
  }

  /** Erase one customer's events, alerts, limit decisions and recorded scores. */
  eraseSubject(
    tenant: string,
    customerId: string,
    options: CallOptions = {},
  ): Promise<Reply<EraseSubjectResponse>> {
    const request = {
      request_id: options.requestId ?? newRequestId(),
      subject: this.subject(tenant, customerId),
    };
    return this.#call(this.#privacy, "EraseSubject", request, options.timeoutMs);
  }

  close(): void {
    this.#connection.close();
  }

  /** One unary call. The request's id also travels as the `x-request-id` header, so the
   * server's log lines, audit record and trailer carry it (without the header the server makes
   * an id of its own). A failure rejects with a PrivscoreError and retires the data key the
   * call used, so the next call seals anew (the server may refuse that key from now on). */
  async #call<T>(
    client: grpc.Client,
    method: string,
    request: { request_id: string },
    timeoutMs: number | undefined,
    key?: DataKey,
  ): Promise<Reply<T>> {
    try {
      const metadata = requestIdMetadata(request.request_id);
      return await unary<T>(client, method, request, metadata, timeoutMs);
    } catch (error) {
      if (key !== undefined) void this.dataKeys.retire(key.method, key);
      throw error;
    }
  }
}

async function getServerInfo(connection: Connection, timeoutMs?: number): Promise<ServerInfo> {
  const discovery = connection.client("DiscoveryService");
  const metadata = new grpc.Metadata();
  const reply = await unary<ServerInfo>(discovery, "GetServerInfo", {}, metadata, timeoutMs);
  return reply.response;
}
