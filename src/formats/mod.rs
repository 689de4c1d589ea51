//! Formats: the canonical model every translation meets at, and one codec per inbound API
//! (DESIGN.md §3). A format knows JSON and SSE, never a connection.

pub mod anthropic_messages;
pub mod canonical;
pub mod openai_chat;

use komilion_sdk::ErrorKind;

/// The error kind a provider's HTTP status stands for, so a translated error keeps its meaning
/// (a 429 stays a rate limit the client's SDK backs off from, a 400 stays the client's mistake).
pub fn error_kind_for_status(status: u16) -> ErrorKind {
    match status {
        400 | 422 => ErrorKind::InvalidRequest,
        401 => ErrorKind::Authentication,
        402 => ErrorKind::InsufficientQuota,
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        408 => ErrorKind::RequestTimeout,
        413 => ErrorKind::RequestTooLarge,
        429 => ErrorKind::RateLimited,
        503 | 529 => ErrorKind::Unavailable,
        504 => ErrorKind::GatewayTimeout,
        500..=599 => ErrorKind::Internal,
        _ => ErrorKind::BadGateway,
    }
}
