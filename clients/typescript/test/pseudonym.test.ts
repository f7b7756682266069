import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { PSEUDONYM_LABEL, Pseudonymiser, fromHex, lengthPrefixed, toHex } from "../src/index.js";
import { pseudonyms } from "./vectors.js";

describe("pseudonym vectors", () => {
  it("use the spec's label", () => {
    assert.equal(toHex(PSEUDONYM_LABEL), pseudonyms.label);
  });

  for (const vector of pseudonyms.cases) {
    it(vector.name, () => {
      assert.equal(toHex(lengthPrefixed(PSEUDONYM_LABEL, vector.tenant, vector.customer_id)), vector.message);
      const pseudonymiser = new Pseudonymiser(fromHex(vector.key));
      assert.equal(pseudonymiser.pseudonym(vector.tenant, vector.customer_id), vector.pseudonym);
    });
  }

  for (const vector of pseudonyms.invalid) {
    it(`refuses ${vector.name}`, () => {
      assert.throws(() => new Pseudonymiser(fromHex(vector.key)).pseudonym(vector.tenant, vector.customer_id), RangeError);
    });
  }
});
