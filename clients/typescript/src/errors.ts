// Rich errors (AIP-193): a failed call's google.rpc.Status, read from the binary trailer
// `grpc-status-details-bin`, with its BadRequest field violations and ErrorInfo, and the
// request id from the `x-request-id` trailer.

import * as grpc from "@grpc/grpc-js";
import protobuf from "protobufjs";

import { resolveImport, vendoredProtoDir } from "./protos.js";

export const STATUS_DETAILS_TRAILER = "grpc-status-details-bin";
/** The request id: a header the caller may send, and a trailer the server always returns. */
export const REQUEST_ID_TRAILER = "x-request-id";
const TYPE_URL_PREFIX = "type.googleapis.com/";

export interface FieldViolation {
  field: string;
  description: string;
  reason: string;
}

export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

export interface StatusDetails {
  code: number;
  message: string;
  errorInfo: ErrorInfo | undefined;
  fieldViolations: FieldViolation[];
  /** Type URLs of details this client does not decode. */
  otherDetails: string[];
}

let statusRoot: protobuf.Root | undefined;

function rpcProtos(): protobuf.Root {
  if (statusRoot === undefined) {
    const root = new protobuf.Root();
    const includeDirs = [vendoredProtoDir()];
    root.resolvePath = (_origin, target) => resolveImport(target, includeDirs);
    root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], {
      keepCase: true,
    });
    statusRoot = root;
  }
  return statusRoot;
}

interface AnyMessage {
  type_url: string;
  value: Uint8Array;
}

/** Decode a serialized google.rpc.Status (the `grpc-status-details-bin` trailer's value). */
export function decodeStatusDetails(bytes: Uint8Array): StatusDetails {
  const root = rpcProtos();
  const status = root.lookupType("google.rpc.Status").toObject(
    root.lookupType("google.rpc.Status").decode(bytes),
    { defaults: true, arrays: true },
  ) as { code: number; message: string; details: AnyMessage[] };
  const out: StatusDetails = {
    code: status.code,
    message: status.message,
    errorInfo: undefined,
    fieldViolations: [],
    otherDetails: [],
  };
  for (const detail of status.details) {
    const name = detail.type_url.startsWith(TYPE_URL_PREFIX)
      ? detail.type_url.slice(TYPE_URL_PREFIX.length)
      : detail.type_url;
    if (name === "google.rpc.BadRequest") {
      const type = root.lookupType(name);
      const bad = type.toObject(type.decode(detail.value), { defaults: true, arrays: true }) as {
        field_violations: FieldViolation[];
      };
      out.fieldViolations.push(
        ...bad.field_violations.map(({ field, description, reason }) => ({
          field,
          description,
          reason,
        })),
      );
    } else if (name === "google.rpc.ErrorInfo") {
      const type = root.lookupType(name);
      const info = type.toObject(type.decode(detail.value), {
        defaults: true,
        objects: true,
      }) as ErrorInfo;
      out.errorInfo = { reason: info.reason, domain: info.domain, metadata: info.metadata };
    } else {
      out.otherDetails.push(detail.type_url);
    }
  }
  return out;
}

const CODE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(grpc.status)
    .filter(([, value]) => typeof value === "number")
    .map(([name, value]) => [value as number, name]),
);

export function requestIdOf(metadata: grpc.Metadata | undefined): string | undefined {
  const value = metadata?.get(REQUEST_ID_TRAILER)[0];
  return value === undefined ? undefined : value.toString();
}

/** A failed privscore call: its status code, message, ErrorInfo reason, field violations and
 * request id. Messages and violations name fields, never values. */
export class PrivscoreError extends Error {
  readonly code: grpc.status;
  readonly codeName: string;
  readonly reason: string | undefined;
  readonly domain: string | undefined;
  readonly fieldViolations: FieldViolation[];
  readonly requestId: string | undefined;
  readonly metadata: grpc.Metadata;

  constructor(status: grpc.StatusObject) {
    const codeName = CODE_NAMES[status.code] ?? String(status.code);
    super(`${codeName}: ${status.details}`);
    this.name = "PrivscoreError";
    this.code = status.code;
    this.codeName = codeName;
    this.metadata = status.metadata;
    this.requestId = requestIdOf(status.metadata);
    const raw = status.metadata.get(STATUS_DETAILS_TRAILER)[0];
    const details = raw instanceof Buffer ? decodeStatusDetails(new Uint8Array(raw)) : undefined;
    this.reason = details?.errorInfo?.reason;
    this.domain = details?.errorInfo?.domain;
    this.fieldViolations = details?.fieldViolations ?? [];
  }
}
