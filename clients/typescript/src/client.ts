// The privscore client: pseudonymises customer ids, seals features under a reused data key
// (sealing format 2) and calls Score, AdjustLimit and EvaluateEvent over mutual TLS, reading
// each call's request id from its trailers and a failure's rich error details.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import { PrivscoreError, REQUEST_ID_TRAILER, requestIdOf } from "./errors.js";
import type { Features } from "./featureValue.js";
import { certificateIdentity, loadPublicKeyset } from "./keys.js";
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

export interface ClientOptions {
  /** host:port of the server. */
  target: string;
  /** PEM: the CA that signed the server's certificate, this client's certificate and key. */
  tls: { ca: Buffer; cert: Buffer; key: Buffer };
  /** The server's primary field-encryption key (from its public keyset). */
  serverKey: ServerPublicKey;
  pseudonymiser: Pseudonymiser;
  /** The served model's feature schema version. */
  schemaVersion: string;
  /** The SPIFFE id of the client certificate; read from `tls.cert` when not given. */
  identity?: string;
  /** Data-key reuse limits (DEFAULT_KEY_LIMITS; any 0 seals a key per request). */
  keyLimits?: KeyLimits;
  /** The directory holding privscore/v1/*.proto; default the repository's protos/. */
  protoRoot?: string;
  channelOptions?: grpc.ChannelOptions;
}

export interface FileOptions {
  target: string;
  caFile: string;
  certFile: string;
  keyFile: string;
  publicKeysetFile: string;
  pseudonymKeyFile: string;
  schemaVersion: string;
  keyLimits?: KeyLimits;
  protoRoot?: string;
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

export class PrivscoreClient {
  readonly schemaVersion: string;
  readonly identity: string;
  readonly dataKeys: DataKeyCache;
  readonly #pseudonymiser: Pseudonymiser;
  readonly #channel: grpc.Channel;
  readonly #scoring: grpc.Client;
  readonly #limits: grpc.Client;
  readonly #alerts: grpc.Client;

  constructor(options: ClientOptions) {
    const identity = options.identity ?? certificateIdentity(options.tls.cert);
    if (!identity) {
      throw new Error("the client certificate has no single spiffe:// URI SAN: no identity");
    }
    this.identity = identity;
    this.schemaVersion = options.schemaVersion;
    this.#pseudonymiser = options.pseudonymiser;
    this.dataKeys = new DataKeyCache(
      options.serverKey,
      identity,
      options.keyLimits ?? { ...DEFAULT_KEY_LIMITS },
    );
    const credentials = grpc.credentials.createSsl(
      options.tls.ca,
      options.tls.key,
      options.tls.cert,
    );
    this.#channel = new grpc.Channel(options.target, credentials, options.channelOptions ?? {});
    const services = loadServices(options.protoRoot);
    const client = (name: string) =>
      new (serviceConstructor(services, name))(options.target, credentials, {
        channelOverride: this.#channel,
      });
    this.#scoring = client("ScoringService");
    this.#limits = client("LimitService");
    this.#alerts = client("AlertService");
  }

  static fromFiles(options: FileOptions): PrivscoreClient {
    return new PrivscoreClient({
      target: options.target,
      tls: {
        ca: readFileSync(options.caFile),
        cert: readFileSync(options.certFile),
        key: readFileSync(options.keyFile),
      },
      serverKey: loadPublicKeyset(options.publicKeysetFile),
      pseudonymiser: Pseudonymiser.fromFile(options.pseudonymKeyFile),
      schemaVersion: options.schemaVersion,
      ...(options.keyLimits ? { keyLimits: options.keyLimits } : {}),
      ...(options.protoRoot ? { protoRoot: options.protoRoot } : {}),
    });
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
    this.#scoring.close();
    this.#limits.close();
    this.#alerts.close();
    this.#channel.close();
  }

  /** One unary call; resolves once the trailers (with the request id) are in. The request's
   * id also travels as the `x-request-id` header, so the server's log lines and trailers
   * carry it (without the header the server makes an id of its own). A failure rejects with
   * a PrivscoreError and retires the data key the call used, so the next call seals anew
   * (the server may refuse that key from now on). */
  #call<T>(
    client: grpc.Client,
    method: string,
    request: { request_id: string },
    timeoutMs: number | undefined,
    key?: DataKey,
  ): Promise<Reply<T>> {
    const rpc = (client as unknown as Record<string, UnaryMethod>)[method]!.bind(client);
    const deadline = Date.now() + (timeoutMs ?? DEFAULT_TIMEOUT_MS);
    const metadata = new grpc.Metadata();
    metadata.set(REQUEST_ID_TRAILER, request.request_id);
    return new Promise((resolve, reject) => {
      let response: unknown;
      const call = rpc(request, metadata, { deadline }, (_error, reply) => {
        response = reply;
      });
      call.on("status", (status: grpc.StatusObject) => {
        if (status.code === grpc.status.OK && response !== undefined) {
          resolve({ response: response as T, requestId: requestIdOf(status.metadata) });
          return;
        }
        if (key !== undefined) void this.dataKeys.retire(key.method, key);
        reject(new PrivscoreError(status));
      });
    });
  }
}
