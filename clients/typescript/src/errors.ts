// Errors as docs/protocol.md section 8 codes them, told apart into retryable
// (the request was not carried out; the same request may succeed later) and
// final (it will fail the same way again).

/** Codes whose requests were not carried out and may be retried as they are. */
const RETRYABLE = new Set([
  "rate_limited",
  "overloaded",
  "unavailable",
  "internal",
  "too_many_connections",
  "too_many_attempts",
  "connection_lost",
]);

export class SwitchboardError extends Error {
  /** The protocol's numeric code (0 for errors of this SDK). */
  readonly code: number;
  /** The protocol's snake_case name, e.g. `not_member`. */
  readonly name: string;
  /** Whether the same request may succeed if sent again later. */
  readonly retryable: boolean;

  constructor(code: number, name: string, message: string) {
    super(`${name}: ${message}`);
    this.code = code;
    this.name = name;
    this.retryable = RETRYABLE.has(name);
  }
}

/** A request that was on the wire when the connection dropped: it may or may
 * not have been carried out (sends are resent by the SDK; other requests are
 * left to the app). */
export function connectionLost(): SwitchboardError {
  return new SwitchboardError(0, "connection_lost", "the connection dropped before the answer came");
}

/** The client was closed by the app. */
export function closed(): SwitchboardError {
  return new SwitchboardError(0, "closed", "the client was closed");
}
