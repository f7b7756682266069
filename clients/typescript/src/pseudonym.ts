// Caller-side pseudonyms (docs/envelope.md section 3): HMAC-SHA256 under the caller's own key,
// which privscore never holds, over the tenant and the raw customer id.

import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";

import { lengthPrefixed, utf8 } from "./bytes.js";

export const PSEUDONYM_LABEL = utf8("privscore.v1/pseudonym\0");
export const MIN_PSEUDONYM_KEY_BYTES = 32;

export class Pseudonymiser {
  readonly #key: Uint8Array;

  constructor(key: Uint8Array) {
    if (key.length < MIN_PSEUDONYM_KEY_BYTES) {
      throw new RangeError(`a pseudonymisation key has at least ${MIN_PSEUDONYM_KEY_BYTES} bytes`);
    }
    this.#key = new Uint8Array(key);
  }

  /** A key file holding the raw key bytes (as `privscore keys init` writes the dev key). */
  static fromFile(path: string): Pseudonymiser {
    return new Pseudonymiser(new Uint8Array(readFileSync(path)));
  }

  /** 64 lowercase hex characters; ids are used exactly as given (no normalisation). */
  pseudonym(tenant: string, customerId: string): string {
    if (customerId.length === 0) throw new RangeError("a customer id must not be empty");
    return createHmac("sha256", this.#key)
      .update(lengthPrefixed(PSEUDONYM_LABEL, tenant, customerId))
      .digest("hex");
  }
}
