// Where the .proto files come from: the repository's protos/ (privscore/v1/*.proto, the only
// source of truth for the wire) and this package's vendored google/rpc protos. The
// google/protobuf well-known types are built into protobufjs.

import { existsSync, readFileSync } from "node:fs";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE_NAME = "@privscore/client";

/** This package's directory (the one holding its package.json). */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const manifest = join(dir, "package.json");
    if (existsSync(manifest) && JSON.parse(readFileSync(manifest, "utf8")).name === PACKAGE_NAME) {
      return dir;
    }
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`cannot find the ${PACKAGE_NAME} package directory`);
    dir = parent;
  }
}

/** google/rpc/status.proto and error_details.proto, vendored (see protos/README.md). */
export function vendoredProtoDir(): string {
  return join(packageRoot(), "protos");
}

/** The repository's protos/ directory: clients/typescript/../../protos. */
export function defaultProtoRoot(): string {
  return resolve(packageRoot(), "..", "..", "protos");
}

/** The privscore files this client loads (each imports what it needs). */
export const SERVICE_PROTO_FILES = [
  "privscore/v1/scoring_service.proto",
  "privscore/v1/limit_service.proto",
  "privscore/v1/alert_service.proto",
  "privscore/v1/discovery_service.proto",
  "privscore/v1/privacy_service.proto",
];

/** Resolve an import against the include directories, as protoc's -I does. */
export function resolveImport(target: string, includeDirs: readonly string[]): string {
  if (isAbsolute(target)) return target;
  for (const dir of includeDirs) {
    const candidate = join(dir, target);
    if (existsSync(candidate)) return candidate;
  }
  return target; // google/protobuf/*.proto: protobufjs's bundled copies
}
