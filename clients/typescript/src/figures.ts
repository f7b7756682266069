// Account state and event figures, sealed as the features are (docs/envelope.md, "Sealed
// account state and event figures"): the same EncryptedFeatures envelope, data-key rules and
// associated data, under the schema versions "account/1" (AdjustLimitRequest.sealed_account)
// and "event/1" (BehaviourEvent.sealed_figures). Amounts are FeatureValue.money_value, counts
// whole numbers as number_value. The clear fields they replace are refused by the server.
//
// These pure functions split what a caller holds in clear (the proto's own shape) into the
// figures to seal and what still travels in clear.

import type { Features, MoneyInput } from "./featureValue.js";

export const ACCOUNT_SCHEMA_VERSION = "account/1";
export const EVENT_SCHEMA_VERSION = "event/1";
export const ACCOUNT_MONEY_FIELDS = ["current_limit", "balance"] as const;
export const ACCOUNT_COUNT_FIELDS = [
  "on_time_repayments_in_row",
  "days_past_due",
  "account_age_days",
] as const;
/** The one figure any event kind may carry: the balance owed right after it. */
export const EVENT_BALANCE_FIELD = "balance_after";

/** The customer's credit account as the lender's ledger shows it now (privscore.v1.AccountState),
 * held in clear by the caller and sealed by the client. */
export interface AccountState {
  current_limit: MoneyInput;
  balance: MoneyInput;
  on_time_repayments_in_row: number;
  days_past_due: number;
  account_age_days: number;
}

/** A behaviour event as the caller holds it, figures in clear, in the proto's shape (exactly
 * one kind set). The client seals the figures; only the kind, its repayment outcome or
 * login device flag, the event id and its time travel in clear. */
export interface BehaviourEvent {
  event_id: string;
  occurred_at: { seconds: number | string; nanos?: number };
  balance_after?: MoneyInput;
  purchase?: { amount: MoneyInput };
  repayment?: { amount: MoneyInput; outcome?: string };
  missed_payment?: { amount_due: MoneyInput; days_past_due: number };
  login?: { new_device?: boolean };
  limit_change?: { new_limit: MoneyInput };
}

export const EVENT_KINDS = [
  "purchase",
  "repayment",
  "missed_payment",
  "login",
  "limit_change",
] as const;
export type EventKind = (typeof EVENT_KINDS)[number];

/** What an event sends in clear: no amount, no days past due, no limit, no balance. */
export interface BehaviourEventMessage {
  event_id: string;
  occurred_at: { seconds: number | string; nanos?: number };
  purchase?: Record<string, never>;
  repayment?: { outcome?: string };
  missed_payment?: Record<string, never>;
  login?: { new_device?: boolean };
  limit_change?: Record<string, never>;
}

function money(value: unknown, what: string): MoneyInput {
  if (
    typeof value !== "object" ||
    value === null ||
    typeof (value as MoneyInput).currency_code !== "string" ||
    !["number", "bigint", "string"].includes(typeof (value as MoneyInput).minor_units)
  ) {
    throw new TypeError(`${what} must be Money: { currency_code, minor_units }`);
  }
  return value as MoneyInput;
}

function wholeNumber(value: unknown, what: string): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value)) {
    throw new TypeError(`${what} must be a whole number`);
  }
  return value;
}

/** The "account/1" figures of an account state: every field, each once. */
export function accountFigures(account: AccountState): Features {
  const known = new Set<string>([...ACCOUNT_MONEY_FIELDS, ...ACCOUNT_COUNT_FIELDS]);
  for (const name of Object.keys(account)) {
    if (!known.has(name)) throw new TypeError(`an account state has no field ${name}`);
  }
  const figures: Features = {};
  for (const name of ACCOUNT_MONEY_FIELDS) figures[name] = money(account[name], `account.${name}`);
  for (const name of ACCOUNT_COUNT_FIELDS) {
    figures[name] = wholeNumber(account[name], `account.${name}`);
  }
  return figures;
}

/** The event's kind: exactly one must be set. */
export function eventKind(event: BehaviourEvent): EventKind {
  const set = EVENT_KINDS.filter((kind) => event[kind] !== undefined && event[kind] !== null);
  if (set.length !== 1) {
    throw new TypeError(
      `an event has exactly one kind (${EVENT_KINDS.join(", ")}); got ${set.length}`,
    );
  }
  return set[0]!;
}

/**
 * Split an event into what travels in clear and its "event/1" figures: "amount" (purchase,
 * repayment, missed payment), "days_past_due" (missed payment), "new_limit" (limit change) and
 * "balance_after" when given. A login without a balance has no figures (and is sent without
 * sealed_figures).
 */
export function eventFigures(event: BehaviourEvent): {
  clear: BehaviourEventMessage;
  figures: Features;
} {
  const kind = eventKind(event);
  const clear: BehaviourEventMessage = { event_id: event.event_id, occurred_at: event.occurred_at };
  const figures: Features = {};
  switch (kind) {
    case "purchase":
      figures.amount = money(event.purchase!.amount, "purchase.amount");
      clear.purchase = {};
      break;
    case "repayment":
      figures.amount = money(event.repayment!.amount, "repayment.amount");
      clear.repayment =
        event.repayment!.outcome === undefined ? {} : { outcome: event.repayment!.outcome };
      break;
    case "missed_payment":
      figures.amount = money(event.missed_payment!.amount_due, "missed_payment.amount_due");
      figures.days_past_due = wholeNumber(
        event.missed_payment!.days_past_due,
        "missed_payment.days_past_due",
      );
      clear.missed_payment = {};
      break;
    case "login":
      clear.login =
        event.login!.new_device === undefined ? {} : { new_device: event.login!.new_device };
      break;
    case "limit_change":
      figures.new_limit = money(event.limit_change!.new_limit, "limit_change.new_limit");
      clear.limit_change = {};
      break;
  }
  if (event.balance_after !== undefined && event.balance_after !== null) {
    figures[EVENT_BALANCE_FIELD] = money(event.balance_after, EVENT_BALANCE_FIELD);
  }
  return { clear, figures };
}
