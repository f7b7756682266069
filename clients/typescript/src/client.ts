// The privscore client: learns the server's sealing key and schema version over the wire
// (DiscoveryService), pseudonymises customer ids, seals features under a reused data key
// (sealing format 2) and calls Score, AdjustLimit and EvaluateEvent over mutual TLS, reading
// each call's request id from its trailers and a failure's rich error details.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import { schemaVersionOf, sealingKey, type ServerInfo } from "./discovery.js";
import { PrivscoreError, REQUEST_ID_TRAILER, requestIdOf } from "./errors.js";
import type { Features } from "./featureValue.js";
import { certificateIdentity } from "./keys.js";
import { SERVICE_PROTO_FILES, defaultProtoRoot, vendoredProtoDir } from "./protos.js";
import { Pseudonymiser } from "./pseudonym.js";
import {
  ADJUST_LIMIT_METHOD,
  DEFAULT_KEY_LIMITS,
  DataKey,
  DataKeyCache,
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
export interface MoneyInput {
  currency_code: string;
  minor_units: number | string;
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
export interface AccountState {
  current_limit: MoneyInput;
  balance: MoneyInput;
  on_time_repayments_in_row?: number;
  days_past_due?: number;
  account_age_days?: number;
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
}
export interface BehaviourEvent {
  event_id: string;
  occurred_at: { seconds: number | string; nanos?: number };
  balance_after?: MoneyInput;
  purchase?: { amount: MoneyInput };
  repayment?: { amount: MoneyInput; outcome: string };
  missed_payment?: { amount_due: MoneyInput; days_past_due: number };
  login?: { new_device: boolean };
  limit_change?: { new_limit: MoneyInput };
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
}
export interface EvaluateEventResponse {
  metadata: DecisionMetadata;
  alerts: Alert[];
  duplicate: boolean;
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

  /** One request's features sealed under the method's current data key. */
  async seal(
    method: string,
    requestId: string,
    subject: Subject,
    features: Features,
  ): Promise<{ sealed: EncryptedFeaturesMessage; key: DataKey }> {
    const plaintexts = encodeFeatures(features);
    const key = await this.dataKeys.take(method, plaintextBytes(plaintexts), plaintexts.length);
    return { sealed: key.sealEncoded(this.schemaVersion, subject, plaintexts, requestId), key };
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

  /** A limit decision from the latest score, or from features scored in the same call. */
  async adjustLimit(
    tenant: string,
    customerId: string,
    account: AccountState,
    source: { latestScore: number } | { features: Features },
    options: CallOptions = {},
  ): Promise<Reply<AdjustLimitResponse>> {
    const requestId = options.requestId ?? newRequestId();
    const subject = this.subject(tenant, customerId);
    if ("latestScore" in source) {
      const request = { request_id: requestId, subject, account, latest_score: source.latestScore };
      return this.#call<AdjustLimitResponse>(this.#limits, "AdjustLimit", request, options.timeoutMs);
    }
    const { sealed, key } = await this.seal(ADJUST_LIMIT_METHOD, requestId, subject, source.features);
    const request = { request_id: requestId, subject, account, features: sealed };
    return this.#call<AdjustLimitResponse>(
      this.#limits,
      "AdjustLimit",
      request,
      options.timeoutMs,
      key,
    );
  }

  async evaluateEvent(
    tenant: string,
    customerId: string,
    event: BehaviourEvent,
    options: CallOptions = {},
  ): Promise<Reply<EvaluateEventResponse>> {
    const request = {
      request_id: options.requestId ?? newRequestId(),
      subject: this.subject(tenant, customerId),
      event,
    };
    return this.#call<EvaluateEventResponse>(
      this.#alerts,
      "EvaluateEvent",
      request,
      options.timeoutMs,
    );
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
