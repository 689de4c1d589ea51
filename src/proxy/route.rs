//! Step 1 of the flow: which API surface a request is for.

use http::Method;
use komilion_sdk::Surface;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `GET /v1/models`
    Models,
    /// `POST /webhooks/stripe`
    StripeWebhook,
    /// `GET /v1/usage`: a key holder's own usage export.
    Usage,
    /// A known path with the wrong method; the value is the `Allow` header.
    MethodNotAllowed(&'static str),
    #[default]
    NotFound,
}

impl Route {
    /// Paths are accepted with or without the `/v1` prefix, since clients differ in whether
    /// their base URL carries it.
    pub fn of(method: &Method, path: &str) -> Route {
        if path == "/webhooks/stripe" {
            return if method == Method::POST {
                Route::StripeWebhook
            } else {
                Route::MethodNotAllowed("POST")
            };
        }
        let path = path.strip_prefix("/v1").unwrap_or(path);
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/chat/completions" if method == Method::POST => Route::ChatCompletions,
            "/chat/completions" => Route::MethodNotAllowed("POST"),
            "/models" if method == Method::GET || method == Method::HEAD => Route::Models,
            "/models" => Route::MethodNotAllowed("GET"),
            "/usage" if method == Method::GET => Route::Usage,
            "/usage" => Route::MethodNotAllowed("GET"),
            _ => Route::NotFound,
        }
    }

    pub fn surface(self) -> Surface {
        Surface::OpenAi
    }

    /// The `route` label of metrics.
    pub fn label(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat_completions",
            Route::Models => "models",
            Route::StripeWebhook => "stripe_webhook",
            Route::Usage => "usage",
            Route::MethodNotAllowed(_) => "method_not_allowed",
            Route::NotFound => "not_found",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::of(&Method::POST, "/v1/chat/completions"), Route::ChatCompletions);
        assert_eq!(Route::of(&Method::POST, "/chat/completions/"), Route::ChatCompletions);
        assert_eq!(
            Route::of(&Method::GET, "/v1/chat/completions"),
            Route::MethodNotAllowed("POST")
        );
        assert_eq!(Route::of(&Method::GET, "/v1/models"), Route::Models);
        assert_eq!(Route::of(&Method::GET, "/v2/models"), Route::NotFound);
    }
}
