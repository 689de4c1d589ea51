//! OpenAI chat completions on the wire: the JSON bodies and SSE chunks the real API sends.
//!
//! Shapes follow the API reference (chat completion object, chat completion chunk object): every
//! chunk repeats `id`, `object`, `created`, `model`, `system_fingerprint`; the first delta carries
//! the role, the last one `finish_reason`; with `stream_options.include_usage` every chunk has
//! `"usage":null` and one extra chunk with empty `choices` carries the usage; `data: [DONE]` ends.

use serde_json::{json, Value};

/// One completion being produced.
pub struct Completion<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub pieces: &'a [String],
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

const FINGERPRINT: &str = "fp_k0m1l10n";

impl Completion<'_> {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
            }
        })
    }

    /// The non-streamed `chat.completion` object.
    pub fn body(&self) -> Vec<u8> {
        let content: String = self.pieces.concat();
        let v = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": self.usage(),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }

    fn chunk(&self, choices: Value, with_usage_field: bool) -> Vec<u8> {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if with_usage_field {
            v["usage"] = Value::Null;
        }
        sse_data(&v)
    }

    /// Every SSE event of the streamed answer, in order, `[DONE]` included.
    pub fn events(&self, include_usage: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(self.pieces.len() + 4);
        let delta =
            |d: Value, finish: Value| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]);
        out.push(self.chunk(
            delta(
                json!({"role": "assistant", "content": "", "refusal": null}),
                Value::Null,
            ),
            include_usage,
        ));
        for piece in self.pieces {
            out.push(self.chunk(delta(json!({"content": piece}), Value::Null), include_usage));
        }
        out.push(self.chunk(delta(json!({}), json!("stop")), include_usage));
        if include_usage {
            let mut v = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "service_tier": "default",
                "system_fingerprint": FINGERPRINT,
                "choices": [],
                "usage": self.usage(),
            });
            v["usage"] = self.usage();
            out.push(sse_data(&v));
        }
        out.push(b"data: [DONE]\n\n".to_vec());
        out
    }
}

fn sse_data(v: &Value) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    out
}

/// An error body as OpenAI sends it for this status.
pub fn error_body(status: u16) -> Vec<u8> {
    let (message, kind, code) = match status {
        400 => ("Invalid request.", "invalid_request_error", Value::Null),
        401 => (
            "Incorrect API key provided.",
            "invalid_request_error",
            json!("invalid_api_key"),
        ),
        404 => (
            "The model does not exist or you do not have access to it.",
            "invalid_request_error",
            json!("model_not_found"),
        ),
        429 => (
            "Rate limit reached for requests. Please try again in 1s.",
            "requests",
            json!("rate_limit_exceeded"),
        ),
        503 => (
            "The engine is currently overloaded, please try again later.",
            "server_error",
            Value::Null,
        ),
        _ => (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            Value::Null,
        ),
    };
    serde_json::to_vec(&json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
        .unwrap_or_default()
}

/// `GET /v1/models`.
pub fn models_body(models: &[String], created: u64) -> Vec<u8> {
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": created, "owned_by": "system"}))
        .collect();
    serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_shapes_match_the_api() {
        let pieces = vec!["Hi".to_string(), " there".to_string()];
        let c = Completion {
            id: "chatcmpl-1",
            created: 1,
            model: "gpt-4o-mini",
            pieces: &pieces,
            prompt_tokens: 5,
            completion_tokens: 2,
        };
        let events = c.events(true);
        assert_eq!(events.len(), 6);
        let parse = |e: &[u8]| -> Value { serde_json::from_slice(&e[6..e.len() - 2]).unwrap() };
        let first = parse(&events[0]);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first["usage"].is_null() && first.as_object().unwrap().contains_key("usage"));
        assert_eq!(parse(&events[3])["choices"][0]["finish_reason"], "stop");
        let usage = parse(&events[4]);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(events[5], b"data: [DONE]\n\n");

        let plain = c.events(false);
        assert_eq!(plain.len(), 5);
        assert!(!parse(&plain[0]).as_object().unwrap().contains_key("usage"));
        let body: Value = serde_json::from_slice(&c.body()).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "Hi there");
    }
}
