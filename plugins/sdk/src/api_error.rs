//! Errors answered to the client, rendered in the format of the API it speaks.

use crate::request::Surface;
use serde_json::json;

/// What went wrong, independent of the wire format. Each kind knows its HTTP status and the
/// `type` strings OpenAI and Anthropic use for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: malformed JSON, missing fields, bad values.
    InvalidRequest,
    /// 401: missing, unknown, expired or revoked credential.
    Authentication,
    /// 402: the wallet cannot cover the request.
    InsufficientQuota,
    /// 403: the credential is valid but not allowed to do this.
    PermissionDenied,
    /// 404: unknown model or route.
    NotFound,
    /// 405: the route exists but not for this method.
    MethodNotAllowed,
    /// 408: the client took too long to send its request head or body.
    RequestTimeout,
    /// 413: the body is over the configured limit.
    RequestTooLarge,
    /// 431: the request head (request line and headers) is over the configured limit.
    HeadersTooLarge,
    /// 429: a rate limit was hit.
    RateLimited,
    /// 500: a bug or an unexpected state inside the gateway.
    Internal,
    /// 502: no upstream could be reached, or it answered garbage.
    BadGateway,
    /// 503: a dependency (the store) is unavailable.
    Unavailable,
    /// 504: the upstream did not answer in time.
    GatewayTimeout,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Authentication => 401,
            ErrorKind::InsufficientQuota => 402,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::HeadersTooLarge => 431,
            ErrorKind::RateLimited => 429,
            ErrorKind::Internal => 500,
            ErrorKind::BadGateway => 502,
            ErrorKind::Unavailable => 503,
            ErrorKind::GatewayTimeout => 504,
        }
    }

    /// The `error.type` OpenAI's API uses for this status.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::Authentication
            | ErrorKind::PermissionDenied
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::RequestTimeout
            | ErrorKind::RequestTooLarge
            | ErrorKind::HeadersTooLarge => "invalid_request_error",
            ErrorKind::InsufficientQuota => "insufficient_quota",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::Internal | ErrorKind::BadGateway | ErrorKind::Unavailable | ErrorKind::GatewayTimeout => {
                "api_error"
            }
        }
    }

    /// The `error.type` Anthropic's API uses for this status.
    pub fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::MethodNotAllowed => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::InsufficientQuota => "billing_error",
            ErrorKind::PermissionDenied => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge | ErrorKind::HeadersTooLarge => "request_too_large",
            ErrorKind::RequestTimeout => "timeout_error",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::Internal | ErrorKind::BadGateway => "api_error",
            ErrorKind::Unavailable => "overloaded_error",
            ErrorKind::GatewayTimeout => "timeout_error",
        }
    }
}

/// An error answered by the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// Machine-readable code (OpenAI's `error.code`), e.g. `invalid_api_key`, `model_not_found`.
    pub code: Option<&'static str>,
    /// Human-readable text. Never include secrets.
    pub message: String,
    /// The request field at fault, if any (OpenAI's `error.param`).
    pub param: Option<&'static str>,
    /// Seconds the client should wait, sent as `retry-after` (429, 503).
    pub retry_after_secs: Option<u64>,
    /// The same wait to the millisecond, sent as `retry-after-ms` (OpenAI's SDKs prefer it).
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            code: None,
            message: message.into(),
            param: None,
            retry_after_secs: None,
            retry_after_ms: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Wait this long before a retry (exact to the millisecond: `retry-after` says the seconds
    /// rounded up, `retry-after-ms` the milliseconds).
    pub fn with_retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_secs = Some(ms.div_ceil(1000).max(1));
        self.retry_after_ms = Some(ms);
        self
    }

    /// The headers that say how long to wait: `retry-after` (seconds) and `retry-after-ms`, or
    /// none when the error names no wait.
    pub fn retry_headers(&self) -> Vec<(&'static str, String)> {
        let Some(secs) = self.retry_after_secs else {
            return Vec::new();
        };
        let ms = self.retry_after_ms.unwrap_or(secs.saturating_mul(1000));
        vec![("retry-after", secs.to_string()), ("retry-after-ms", ms.to_string())]
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The JSON body in the client's API format.
    pub fn render(&self, surface: Surface) -> Vec<u8> {
        let value = match surface {
            Surface::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": self.kind.openai_type(),
                    "param": self.param,
                    "code": self.code,
                }
            }),
            Surface::Anthropic => json!({
                "type": "error",
                "error": { "type": self.kind.anthropic_type(), "message": self.message },
            }),
        };
        // Serializing a `Value` built from strings cannot fail.
        serde_json::to_vec(&value).unwrap_or_default()
    }

    // Constructors for the errors several places raise, so their wording stays the same.

    pub fn malformed_json(detail: impl std::fmt::Display) -> Self {
        ApiError::new(
            ErrorKind::InvalidRequest,
            format!("We could not parse the JSON body of your request: {detail}"),
        )
        .with_code("invalid_json")
    }

    pub fn missing_api_key() -> Self {
        ApiError::new(
            ErrorKind::Authentication,
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>` \
             (or `x-api-key: <key>`).",
        )
        .with_code("missing_api_key")
    }

    pub fn invalid_api_key() -> Self {
        ApiError::new(ErrorKind::Authentication, "Incorrect API key provided.").with_code("invalid_api_key")
    }

    /// The store (keys, accounts, wallets, usage) cannot answer; the client may retry.
    pub fn store_unavailable(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Unavailable, message).with_code("store_unavailable")
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError::new(
            ErrorKind::NotFound,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_code("model_not_found")
        .with_param("model")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status(), self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e = ApiError::model_not_found("nope");
        let v: serde_json::Value = serde_json::from_slice(&e.render(Surface::OpenAi)).unwrap();
        assert_eq!(e.status(), 404);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    }

    #[test]
    fn anthropic_shape() {
        let e = ApiError::invalid_api_key();
        let v: serde_json::Value = serde_json::from_slice(&e.render(Surface::Anthropic)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
    }
}
