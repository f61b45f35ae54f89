//! Every error and close code on the wire, with its rule.
//!
//! Reserved ranges:
//! - `1000..=1999`: request errors, sent as an `error` frame. The connection
//!   stays open; the client may retry only when [`ErrorCode::retryable`] says so.
//! - `2000..=2999`: HTTP errors, sent as a JSON body with the matching status.
//! - WebSocket close codes: the standard ones (1001, 1002, 1007, 1009) where
//!   RFC 6455 requires them, and `4000..=4999` for Switchboard's own. Every close
//!   code says whether to reconnect; see [`CloseCode`].
//!
//! docs/protocol.md renders this table; a test keeps the two in step.

macro_rules! error_codes {
    ($( $variant:ident = $code:literal, $name:literal, $retry:literal, $http:literal, $doc:literal; )*) => {
        /// A coded error a client can act on.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( #[doc = $doc] $variant = $code, )*
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            pub fn code(self) -> u16 { self as u16 }

            /// The stable snake_case name clients may match on instead of the number.
            pub fn name(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// Whether the same request may succeed if sent again later.
            pub fn retryable(self) -> bool {
                match self { $(ErrorCode::$variant => $retry,)* }
            }

            /// The HTTP status that carries this error on the HTTP endpoints (0: not an HTTP error).
            pub fn http_status(self) -> u16 {
                match self { $(ErrorCode::$variant => $http,)* }
            }

            pub fn description(self) -> &'static str {
                match self { $(ErrorCode::$variant => $doc,)* }
            }

            pub fn from_code(code: u16) -> Option<ErrorCode> {
                match code { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    Internal = 1000, "internal", true, 0, "The server failed while handling the request; nothing was changed. Retry with backoff.";
    MalformedFrame = 1001, "malformed_frame", false, 0, "The frame could not be decoded: invalid JSON, a failed FlatBuffers verification, or a missing or mistyped field.";
    UnknownType = 1002, "unknown_type", false, 0, "The frame decoded but names a message type this server does not know.";
    InvalidUtf8 = 1003, "invalid_utf8", false, 0, "A JSON-subprotocol binary frame was not valid UTF-8. (A text frame with invalid UTF-8 closes the connection with 1007, as RFC 6455 requires.)";
    InvalidField = 1004, "invalid_field", false, 0, "A field is out of range: empty or over-long client_msg_id, empty or over-long title, limit outside 1..=100, an unknown user id in a member list, and so on.";
    BodyTooLarge = 1005, "body_too_large", false, 0, "The message body is larger than the server's max_body_bytes.";
    FrameTooLarge = 1006, "frame_too_large", false, 0, "A WebSocket frame or message exceeded max_frame_bytes; the connection closes with 1009 after this error.";
    NotFound = 1010, "not_found", false, 0, "The conversation or user does not exist.";
    NotMember = 1011, "not_member", false, 0, "You are not a member of this conversation, so you cannot send to it or read it.";
    Forbidden = 1012, "forbidden", false, 0, "Your role in this conversation does not allow this change.";
    MemberCap = 1013, "member_cap", false, 0, "The group would exceed its member cap.";
    BadCursor = 1014, "bad_cursor", false, 0, "A pagination position or cursor is invalid: both before and after given, a position past the conversation's end, or a cursor this server did not issue.";
    NotAContact = 1015, "not_a_contact", false, 0, "You may add someone to a group only once they have chatted with you: sent or read a message in your direct conversation.";
    AttachmentInvalid = 1016, "attachment_invalid", false, 0, "The attachment named was never uploaded, was uploaded by someone else, or belongs to another conversation.";
    Overloaded = 1020, "overloaded", true, 0, "A server queue is full; the request was not accepted. Retry with backoff.";
    RateLimited = 1021, "rate_limited", true, 0, "This connection sent more of this request than its rate limit allows; the request was not accepted. Slow down and resend later. Persisting closes the connection with 1008.";
    Unavailable = 1022, "unavailable", true, 0, "The node that owns this conversation could not be reached (ownership is moving between gateway nodes, or the link between them is down); the request was not accepted. Retry with backoff.";
    AttachmentStoreUnavailable = 1023, "attachment_store_unavailable", true, 0, "The object store holding the attachment this send names could not be reached; the message was not accepted. Retry with backoff (the same client_msg_id).";
    InvalidRequest = 2001, "invalid_request", false, 400, "The HTTP request body is not the JSON object the endpoint expects.";
    InvalidUsername = 2002, "invalid_username", false, 400, "Usernames are 3 to 32 characters from a-z, A-Z, 0-9, '_', '.', '-'.";
    WeakPassword = 2003, "weak_password", false, 400, "Passwords are 8 to 128 characters.";
    UsernameTaken = 2004, "username_taken", false, 409, "That username is registered already (usernames are case-insensitive).";
    InvalidCredentials = 2005, "invalid_credentials", false, 401, "Unknown username or wrong password.";
    Unauthorized = 2006, "unauthorized", false, 401, "The bearer token is missing, malformed, badly signed or expired. Log in again.";
    HttpNotFound = 2007, "no_such_endpoint", false, 404, "No endpoint at this path.";
    MethodNotAllowed = 2008, "method_not_allowed", false, 405, "The endpoint exists but not for this HTTP method.";
    PayloadTooLarge = 2009, "payload_too_large", false, 413, "The HTTP request head or body is larger than the server accepts.";
    BadSubprotocol = 2010, "bad_subprotocol", false, 400, "Sec-WebSocket-Protocol names none of switchboard.v1.fb, switchboard.v1.json.";
    HttpInternal = 2011, "internal_error", true, 500, "The server failed while handling the request. Retry with backoff.";
    HttpOverloaded = 2012, "overloaded", true, 503, "The server is too busy to take the request. Retry with backoff.";
    HeadersTooLarge = 2013, "headers_too_large", false, 431, "The HTTP request has more header fields than the server accepts (100).";
    TooManyAttempts = 2014, "too_many_attempts", true, 429, "Too many failed logins for this account or from this address, or too many logins and registrations in flight from this address; retry after the Retry-After seconds.";
    TooManyConnections = 2015, "too_many_connections", true, 429, "This user already has the most connections (devices) the server allows; close one, or retry later.";
    UserNotFound = 2016, "user_not_found", false, 404, "No user has that username.";
    UrlInvalid = 2017, "url_invalid", false, 403, "The presigned URL does not verify: it was changed, or it was made for another object or method.";
    UrlExpired = 2018, "url_expired", false, 403, "The presigned URL has expired. Ask for a new one.";
    AttachmentMismatch = 2019, "attachment_mismatch", false, 400, "The upload is not what its slot declared: another size, media type or SHA-256. Nothing was stored.";
    AttachmentTooLarge = 2020, "attachment_too_large", false, 413, "The attachment is larger than the server accepts (attachments.max_bytes).";
    MediaTypeNotAllowed = 2021, "media_type_not_allowed", false, 415, "The server does not accept attachments of that media type (attachments.media_types).";
    UploadBudgetExceeded = 2022, "upload_budget_exceeded", true, 429, "You have reserved as many upload bytes this hour as the server allows (attachments.upload_bytes_per_hour); retry after the Retry-After seconds.";
    NotAMember = 2023, "not_a_member", false, 403, "You are not a member of that conversation (or it does not exist).";
    AttachmentNotFound = 2024, "attachment_not_found", false, 404, "No such attachment: never uploaded, removed, or not of a conversation you are in.";
    AlreadyUploaded = 2025, "already_uploaded", false, 409, "That attachment is uploaded already; an upload slot is used once.";
    InvalidFileName = 2026, "invalid_file_name", false, 400, "File names are 1 to 255 bytes of UTF-8 with no path separators, control characters or leading dot-only names.";
    StorageUnavailable = 2027, "storage_unavailable", true, 503, "The object store could not be reached or failed; nothing was stored. Retry with backoff.";
}

/// WebSocket close codes the server sends, each with its reconnect rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 1001: the server is shutting down. Reconnect with backoff.
    GoingAway = 1001,
    /// 1002: the peer broke the WebSocket protocol (bad opcode, unmasked frame, ...). Reconnect.
    ProtocolError = 1002,
    /// 1007: a text frame was not valid UTF-8. Reconnect; do not resend that frame.
    InvalidPayload = 1007,
    /// 1009: a frame or message exceeded max_frame_bytes. Reconnect; do not resend that frame.
    MessageTooBig = 1009,
    /// 1008: the client kept exceeding its rate limits after 1021 errors. Reconnect after a
    /// backoff of seconds, and send less.
    PolicyViolation = 1008,
    /// 4008: the client fell behind (outbound queue full) and events were dropped.
    /// Reconnect and `sync` from the positions it has; nothing acknowledged is lost.
    SlowConsumer = 4008,
    /// 4009: the connection held more unsynced events than allowed before its `sync`.
    /// Reconnect and send `sync` first.
    SyncBacklog = 4009,
    /// 4010: no `sync` within `limits.sync_deadline_secs` of the upgrade. Reconnect and
    /// send `sync` first.
    SyncTimeout = 4010,
}

impl CloseCode {
    pub const ALL: &'static [CloseCode] = &[
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidPayload,
        CloseCode::MessageTooBig,
        CloseCode::PolicyViolation,
        CloseCode::SlowConsumer,
        CloseCode::SyncBacklog,
        CloseCode::SyncTimeout,
    ];

    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::GoingAway => "server shutting down: reconnect (another node serves you) and sync",
            CloseCode::ProtocolError => "websocket protocol error",
            CloseCode::InvalidPayload => "invalid utf-8 in text frame",
            CloseCode::MessageTooBig => "frame too large",
            CloseCode::PolicyViolation => "rate limits exceeded persistently: back off",
            CloseCode::SlowConsumer => "slow consumer: reconnect and sync",
            CloseCode::SyncBacklog => "too many events before sync: reconnect and sync first",
            CloseCode::SyncTimeout => "no sync in time: reconnect and sync first",
        }
    }

    /// Every Switchboard close asks the client to come back; only what it resends differs.
    pub fn reconnect(self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_in_their_ranges() {
        let mut seen = std::collections::HashSet::new();
        for e in ErrorCode::ALL {
            assert!(seen.insert(e.code()), "duplicate code {}", e.code());
            assert_eq!(ErrorCode::from_code(e.code()), Some(*e));
            match e.code() {
                1000..=1999 => assert_eq!(e.http_status(), 0, "{e:?}"),
                2000..=2999 => assert!(e.http_status() >= 400, "{e:?}"),
                _ => panic!("{e:?} outside the reserved ranges"),
            }
        }
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// docs/protocol.md is what client authors read: every code must be there, with its name.
    #[test]
    fn protocol_doc_lists_every_code() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
        for e in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", e.code(), e.name());
            assert!(doc.contains(&row), "docs/protocol.md lacks the row for {e:?}: {row}");
            assert!(doc.contains(e.description()), "docs/protocol.md lacks the description of {e:?}");
        }
        for c in CloseCode::ALL {
            assert!(
                doc.contains(&format!("| {} |", c.code())),
                "docs/protocol.md lacks close code {}",
                c.code()
            );
        }
    }
}

/// As its number: the form nodes of a fleet exchange it in.
impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.code())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ErrorCode, D::Error> {
        let n = <u16 as serde::Deserialize>::deserialize(d)?;
        ErrorCode::from_code(n).ok_or_else(|| serde::de::Error::custom(format!("unknown error code {n}")))
    }
}
