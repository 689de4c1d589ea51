//! The request as plugins see it before its body is read.

use http::{HeaderMap, Method};
use std::net::SocketAddr;

/// Which public API the client is speaking. It decides the error format of local answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Surface {
    /// OpenAI-compatible routes (`/v1/chat/completions`, `/v1/models`, ...).
    #[default]
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`).
    Anthropic,
}

/// An owned view of the request line and headers.
///
/// Built once per request by the engine; cloning the header map costs about a microsecond and
/// buys plugins independence from Pingora's session type.
#[derive(Debug, Clone)]
pub struct RequestView {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub client_addr: Option<SocketAddr>,
}

impl RequestView {
    pub fn new(method: Method, path: impl Into<String>, headers: HeaderMap) -> Self {
        RequestView {
            method,
            path: path.into(),
            headers,
            client_addr: None,
        }
    }

    /// The value of a header if it is present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The caller's credential: `Authorization: Bearer <token>` or, as Anthropic clients send
    /// it, `x-api-key: <token>`. Surrounding whitespace is ignored; an empty value is absent.
    pub fn credential(&self) -> Option<&str> {
        let bearer = self.header("authorization").and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
        });
        bearer
            .or_else(|| self.header("x-api-key").map(str::trim))
            .filter(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(headers: &[(&'static str, &'static str)]) -> RequestView {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, http::HeaderValue::from_static(v));
        }
        RequestView::new(Method::POST, "/v1/chat/completions", map)
    }

    #[test]
    fn credential_prefers_bearer_then_x_api_key() {
        assert_eq!(view(&[("authorization", "Bearer abc")]).credential(), Some("abc"));
        assert_eq!(view(&[("authorization", "bearer  abc ")]).credential(), Some("abc"));
        assert_eq!(view(&[("x-api-key", "xyz")]).credential(), Some("xyz"));
        assert_eq!(
            view(&[("authorization", "Bearer a"), ("x-api-key", "b")]).credential(),
            Some("a")
        );
        assert_eq!(view(&[("authorization", "Basic abc")]).credential(), None);
        assert_eq!(view(&[("authorization", "Bearer ")]).credential(), None);
        assert_eq!(view(&[]).credential(), None);
    }
}
