//! Provider adapters: what differs between upstream APIs, behind one trait (DESIGN.md §3,
//! STYLE.md 2(e)).
//!
//! An adapter turns the canonical request into the provider's request target, headers and
//! body, and the provider's answers, stream events and errors back into canonical ones. It
//! knows `formats::canonical` and never a connection: sending, pooling, timeouts and
//! fallbacks stay in `upstream` and `proxy::forward`, the same for every provider.
//!
//! The `openai` kind needs no translation for the OpenAI surface (the client's body is spliced
//! and relayed byte for byte); its adapter exists for the other surfaces.

pub mod anthropic;
pub mod azure;
pub mod breaker;
pub mod byok;
pub mod cohere;
pub mod gemini;
pub mod openai;
pub mod translate;

use crate::config::{ProviderConfig, ProviderKind};
use crate::formats::canonical::{Answer, Event, Request};
use crate::sse::SseEvent;
use komilion_sdk::ApiError;

/// One upstream API's format.
pub trait ProviderAdapter: Send + Sync {
    /// The request target of a chat request for `model` (`base_path` is the configured base
    /// URL's path, e.g. `/v1`).
    fn chat_target(&self, base_path: &str, model: &str, stream: bool) -> String;

    /// The target depends on the model or on streaming (Gemini, Azure deployments): built per
    /// request instead of once.
    fn target_names_model(&self) -> bool {
        false
    }

    /// The provider reads and writes OpenAI's chat completions as they are (OpenAI, Azure,
    /// every OpenAI-compatible server): the OpenAI surface splices instead of translating.
    fn speaks_openai_chat(&self) -> bool {
        false
    }

    /// The credential headers for `api_key`, plus any header the API requires.
    fn auth_headers(&self, api_key: &str) -> Vec<(&'static str, String)>;

    /// The provider's request body for `request`, sent to `model`.
    fn encode_request(&self, request: &Request, model: &str) -> Result<Vec<u8>, ApiError>;

    /// A whole (non-streamed) successful answer.
    fn decode_answer(&self, body: &[u8]) -> Result<Answer, String>;

    /// A decoder for one streamed answer.
    fn stream_decoder(&self) -> Box<dyn StreamDecoder>;

    /// An error answer (status not 2xx; the body already scrubbed of secrets), as the error the
    /// client gets: same meaning, the provider's message, the client's surface's shape.
    fn decode_error(&self, status: u16, body: &[u8]) -> ApiError;
}

/// Turns one provider's SSE events into canonical events, carrying what the format needs
/// between events (which content block is which tool call, the usage seen so far).
pub trait StreamDecoder: Send {
    /// Decode one complete event; an error means the stream cannot be trusted any further.
    fn decode(&mut self, event: &SseEvent<'_>, out: &mut Vec<Event>) -> Result<(), String>;

    /// The upstream ended its stream cleanly: a format without an end event (Gemini) says
    /// here that the answer is complete.
    fn finish(&mut self, _out: &mut Vec<Event>) {}
}

/// The adapter for a provider.
pub fn adapter_for(config: &ProviderConfig) -> Box<dyn ProviderAdapter> {
    match config.kind {
        ProviderKind::Openai => Box::new(openai::OpenAi),
        ProviderKind::Anthropic => Box::new(anthropic::Anthropic),
        ProviderKind::Gemini => Box::new(gemini::Gemini),
        ProviderKind::Azure => Box::new(azure::Azure::new(config)),
        ProviderKind::Cohere => Box::new(cohere::Cohere),
    }
}

/// The names a format gives the settings that sit at the top level of its request body.
pub(crate) struct TopLevelNames {
    pub top_p: &'static str,
    pub stop: &'static str,
    /// Where `{"type": "json_object"}` goes, when the format has it.
    pub json_output: Option<&'static str>,
}

/// Write the request's output cap, sampling settings, stop sequences, JSON mode and stream
/// flag under `names`, then the body as bytes.
pub(crate) fn finish_body(
    mut body: serde_json::Map<String, serde_json::Value>,
    request: &Request,
    names: TopLevelNames,
) -> Result<Vec<u8>, ApiError> {
    use serde_json::json;
    if let Some(max) = request.max_tokens {
        body.insert("max_tokens".into(), json!(max));
    }
    if let Some(t) = request.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(p) = request.top_p {
        body.insert(names.top_p.into(), json!(p));
    }
    if !request.stop.is_empty() {
        body.insert(names.stop.into(), json!(request.stop));
    }
    if let (true, Some(field)) = (request.json_output, names.json_output) {
        body.insert(field.into(), json!({"type": "json_object"}));
    }
    if request.stream {
        body.insert("stream".into(), json!(true));
    }
    body_bytes(&body)
}

/// A request body as bytes.
pub(crate) fn body_bytes(body: &serde_json::Map<String, serde_json::Value>) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(body).map_err(|e| ApiError::new(komilion_sdk::ErrorKind::Internal, e.to_string()))
}

/// A tool as an OpenAI-style function tool (OpenAI and Cohere write them alike).
pub(crate) fn function_tool(tool: &crate::formats::canonical::ToolDef) -> serde_json::Value {
    let mut function = serde_json::json!({"name": tool.name, "parameters": tool.parameters});
    if let Some(d) = &tool.description {
        function["description"] = serde_json::json!(d);
    }
    serde_json::json!({"type": "function", "function": function})
}

/// One stream event's data as `T`: None for an event without data (a keep-alive or comment),
/// an error for data that is not what the format sends.
pub(crate) fn event_json<T: serde::de::DeserializeOwned>(event: &SseEvent<'_>) -> Result<Option<T>, String> {
    let data = event.data.trim();
    if data.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(data)
        .map(Some)
        .map_err(|e| format!("the provider sent an event that is not valid JSON ({e})"))
}

/// The message of a provider's JSON error body, at `pointer`, cut to a sane length; the whole
/// body (cut) when it is not JSON.
pub(crate) fn error_message(body: &[u8], pointer: &str) -> String {
    const MAX: usize = 2048;
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer(pointer).and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    if message.len() <= MAX {
        return message;
    }
    let mut cut = MAX;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &message[..cut])
}
