//! Step 1 of the flow: which API surface a request is for.

use http::Method;
use komilion_sdk::Surface;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/messages`: Anthropic's Messages API.
    Messages,
    /// `POST /v1/messages/count_tokens`
    CountTokens,
    /// `GET /v1/models`
    Models,
    /// `GET /v1/models/{id}`
    Model,
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
            "/messages" if method == Method::POST => Route::Messages,
            "/messages/count_tokens" if method == Method::POST => Route::CountTokens,
            "/messages" | "/messages/count_tokens" => Route::MethodNotAllowed("POST"),
            "/models" if method == Method::GET || method == Method::HEAD => Route::Models,
            "/models" => Route::MethodNotAllowed("GET"),
            _ if path.len() > "/models/".len() && path.starts_with("/models/") => {
                if method == Method::GET || method == Method::HEAD {
                    Route::Model
                } else {
                    Route::MethodNotAllowed("GET")
                }
            }
            "/usage" if method == Method::GET => Route::Usage,
            "/usage" => Route::MethodNotAllowed("GET"),
            _ => Route::NotFound,
        }
    }

    /// Routes that reach a provider: each request is held, settled and recorded.
    pub fn is_metered(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Messages)
    }

    /// The API whose shapes (errors included) the client expects.
    pub fn surface(self) -> Surface {
        match self {
            Route::Messages | Route::CountTokens => Surface::Anthropic,
            _ => Surface::OpenAi,
        }
    }

    /// The `route` label of metrics.
    pub fn label(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat_completions",
            Route::Messages => "messages",
            Route::CountTokens => "count_tokens",
            Route::Models | Route::Model => "models",
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
        assert_eq!(Route::of(&Method::POST, "/v1/messages"), Route::Messages);
        assert_eq!(Route::of(&Method::GET, "/v1/models/gpt-4o"), Route::Model);
        assert_eq!(Route::of(&Method::GET, "/v1/models/"), Route::Models);
        assert_eq!(
            Route::of(&Method::DELETE, "/v1/models/x"),
            Route::MethodNotAllowed("GET")
        );
        assert_eq!(
            Route::of(&Method::POST, "/v1/messages/count_tokens"),
            Route::CountTokens
        );
        assert_eq!(Route::Messages.surface(), Surface::Anthropic);
        assert_eq!(Route::ChatCompletions.surface(), Surface::OpenAi);
    }
}
