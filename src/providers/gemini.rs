//! Google's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`), both ways.
//!
//! What differs: the model is in the request target; the key goes in `x-goog-api-key`; turns
//! are `contents` of `user` and `model` with `parts`; the system prompt is `systemInstruction`;
//! tools are `functionDeclarations` and a call's result is matched by the function's name, not
//! an id; generation settings sit in `generationConfig`; a stream is a series of whole
//! `GenerateContentResponse` objects with no end event (the stream's end is the end); usage is
//! `usageMetadata`, whose prompt count includes cached tokens and whose thinking tokens are
//! billed as output.

use super::{error_message, event_json, ProviderAdapter, StreamDecoder};
use crate::formats::canonical::{texts, Answer, Event, ImageSource, Part, Request, Role, StopReason, ToolChoice};
use crate::formats::error_kind_for_status;
use crate::sse::SseEvent;
use komilion_sdk::{ApiError, Usage};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub struct Gemini;

/// What a model id may keep as is in the request target.
const MODEL_IN_PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

impl ProviderAdapter for Gemini {
    fn chat_target(&self, base_path: &str, model: &str, stream: bool) -> String {
        // Model ids are path-safe (`gemini-2.5-flash`); anything else is escaped, not trusted.
        let model = percent_encoding::utf8_percent_encode(model, MODEL_IN_PATH);
        if stream {
            format!("{base_path}/models/{model}:streamGenerateContent?alt=sse")
        } else {
            format!("{base_path}/models/{model}:generateContent")
        }
    }

    fn target_names_model(&self) -> bool {
        true
    }

    fn auth_headers(&self, api_key: &str) -> Vec<(&'static str, String)> {
        vec![("x-goog-api-key", api_key.to_owned())]
    }

    fn encode_request(&self, request: &Request, _model: &str) -> Result<Vec<u8>, ApiError> {
        let mut body = Map::new();
        let contents: Vec<Value> = request
            .messages
            .iter()
            .map(|m| {
                json!({
                    "role": match m.role { Role::User => "user", Role::Assistant => "model" },
                    "parts": m.parts.iter().filter_map(|p| part(p, request)).collect::<Vec<_>>(),
                })
            })
            .collect();
        body.insert("contents".into(), Value::Array(contents));
        if !request.system.is_empty() {
            let parts: Vec<Value> = request.system.iter().filter_map(|p| part(p, request)).collect();
            body.insert("systemInstruction".into(), json!({"parts": parts}));
        }
        if !request.tools.is_empty() {
            let declarations: Vec<Value> = request
                .tools
                .iter()
                .map(|t| {
                    let mut d = json!({"name": t.name, "parameters": schema(&t.parameters)});
                    if let Some(description) = &t.description {
                        d["description"] = json!(description);
                    }
                    d
                })
                .collect();
            body.insert("tools".into(), json!([{"functionDeclarations": declarations}]));
            if let Some(choice) = &request.tool_choice {
                let config = match choice {
                    ToolChoice::Auto => json!({"mode": "AUTO"}),
                    ToolChoice::None => json!({"mode": "NONE"}),
                    ToolChoice::Required => json!({"mode": "ANY"}),
                    ToolChoice::Tool(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
                };
                body.insert("toolConfig".into(), json!({"functionCallingConfig": config}));
            }
        }
        let mut generation = Map::new();
        if let Some(max) = request.max_tokens {
            generation.insert("maxOutputTokens".into(), json!(max));
        }
        if let Some(t) = request.temperature {
            generation.insert("temperature".into(), json!(t));
        }
        if let Some(p) = request.top_p {
            generation.insert("topP".into(), json!(p));
        }
        if !request.stop.is_empty() {
            generation.insert("stopSequences".into(), json!(request.stop));
        }
        if request.json_output {
            generation.insert("responseMimeType".into(), json!("application/json"));
        }
        if !generation.is_empty() {
            body.insert("generationConfig".into(), Value::Object(generation));
        }
        super::body_bytes(&body)
    }

    fn decode_answer(&self, body: &[u8]) -> Result<Answer, String> {
        let answer: WireResponse =
            serde_json::from_slice(body).map_err(|e| format!("not a generateContent answer: {e}"))?;
        let mut parts = Vec::new();
        let mut stop = None;
        let mut calls = 0;
        if let Some(candidate) = answer.candidates.into_iter().next() {
            for p in candidate.content.map(|c| c.parts).unwrap_or_default() {
                if p.thought == Some(true) {
                    continue;
                }
                if let Some(text) = p.text {
                    parts.push(Part::text(text));
                }
                if let Some(call) = p.function_call {
                    parts.push(Part::ToolCall {
                        id: call_id(&answer.response_id, calls),
                        name: call.name,
                        arguments: call.args.map_or_else(|| "{}".to_owned(), |a| a.to_string()),
                    });
                    calls += 1;
                }
            }
            stop = candidate.finish_reason.as_deref().map(|r| finish_reason(r, calls > 0));
        }
        Ok(Answer {
            id: answer.response_id,
            parts,
            stop,
            usage: answer.usage_metadata.map(WireUsage::into_usage),
        })
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(GeminiStream::default())
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> ApiError {
        ApiError::new(error_kind_for_status(status), error_message(body, "/error/message")).with_code("upstream_error")
    }
}

/// One canonical part as a Gemini part. A tool result names its function, found from the
/// call it answers.
fn part(p: &Part, request: &Request) -> Option<Value> {
    Some(match p {
        Part::Text { text, .. } => json!({"text": text}),
        Part::Image {
            source: ImageSource::Base64 { media_type, data },
            ..
        } => json!({"inlineData": {"mimeType": media_type, "data": data}}),
        Part::Image {
            source: ImageSource::Url(url),
            ..
        } => json!({"fileData": {"mimeType": image_type(url), "fileUri": url}}),
        Part::ToolCall { name, arguments, .. } => {
            let args = serde_json::from_str::<Value>(arguments)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            json!({"functionCall": {"name": name, "args": args}})
        }
        Part::ToolResult { call_id, content, .. } => {
            let text = texts(content).collect::<Vec<_>>().join("\n");
            json!({"functionResponse": {"name": function_name(request, call_id), "response": {"content": text}}})
        }
    })
}

/// The name of the function whose call had this id (Gemini matches results by name).
fn function_name(request: &Request, call_id: &str) -> String {
    request
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .find_map(|p| match p {
            Part::ToolCall { id, name, .. } if id == call_id => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Gemini needs an image URL's type; it is read from the extension, JPEG otherwise.
fn image_type(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url).to_ascii_lowercase();
    match path.rsplit('.').next() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("heic") => "image/heic",
        _ => "image/jpeg",
    }
}

/// A JSON schema as Gemini's function parameters read it: its OpenAPI subset refuses some
/// JSON-schema keywords that OpenAI accepts.
fn schema(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "additionalProperties" | "$schema" | "strict"))
                .map(|(k, v)| (k.clone(), schema(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(schema).collect()),
        other => other.clone(),
    }
}

/// Gemini gives calls no id; the gateway makes one a client can send back.
fn call_id(response_id: &str, n: usize) -> String {
    let tail: String = response_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(24)
        .collect();
    format!("call_{tail}_{n}")
}

fn finish_reason(reason: &str, called: bool) -> StopReason {
    match reason {
        "MAX_TOKENS" => StopReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            StopReason::ContentFilter
        }
        _ if called => StopReason::ToolCalls,
        _ => StopReason::Stop,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    #[serde(default)]
    candidates: Vec<WireCandidate>,
    usage_metadata: Option<WireUsage>,
    #[serde(default)]
    response_id: String,
    error: Option<WireError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    content: Option<WireContent>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireContent {
    #[serde(default)]
    parts: Vec<WirePart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePart {
    text: Option<String>,
    thought: Option<bool>,
    function_call: Option<WireCall>,
}

#[derive(Deserialize)]
struct WireCall {
    name: String,
    args: Option<Value>,
}

#[derive(Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    tool_use_prompt_token_count: u64,
}

impl WireUsage {
    fn into_usage(self) -> Usage {
        // A provider's numbers are not trusted not to overflow.
        let input = self.prompt_token_count.saturating_add(self.tool_use_prompt_token_count);
        Usage {
            input_tokens: input,
            cached_input_tokens: self.cached_content_token_count.min(input),
            // Thinking is billed at the output price.
            output_tokens: self.candidates_token_count.saturating_add(self.thoughts_token_count),
            reasoning_tokens: self.thoughts_token_count,
            ..Usage::default()
        }
    }
}

#[derive(Deserialize)]
struct WireError {
    code: Option<u16>,
    message: Option<String>,
}

#[derive(Default)]
struct GeminiStream {
    started: bool,
    calls: usize,
    stop: Option<StopReason>,
    usage: Option<WireUsage>,
    done: bool,
}

impl StreamDecoder for GeminiStream {
    fn decode(&mut self, event: &SseEvent<'_>, out: &mut Vec<Event>) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        let Some(chunk) = event_json::<WireResponse>(event)? else {
            return Ok(());
        };
        if let Some(error) = chunk.error {
            out.push(Event::Error {
                status: error.code.unwrap_or(500),
                message: error
                    .message
                    .unwrap_or_else(|| "The provider reported an error.".into()),
            });
            return Ok(());
        }
        if !self.started {
            self.started = true;
            out.push(Event::Start {
                id: chunk.response_id.clone(),
            });
        }
        if let Some(u) = chunk.usage_metadata {
            self.usage = Some(u);
        }
        if let Some(candidate) = chunk.candidates.into_iter().next() {
            for p in candidate.content.map(|c| c.parts).unwrap_or_default() {
                if p.thought == Some(true) {
                    continue;
                }
                if let Some(text) = p.text.filter(|t| !t.is_empty()) {
                    out.push(Event::Text(text));
                }
                if let Some(call) = p.function_call {
                    // Gemini sends a call whole: its start and all its arguments at once.
                    let index = self.calls;
                    self.calls += 1;
                    out.push(Event::ToolCallStart {
                        index,
                        id: call_id(&chunk.response_id, index),
                        name: call.name,
                    });
                    out.push(Event::ToolCallArguments {
                        index,
                        fragment: call.args.map_or_else(|| "{}".to_owned(), |a| a.to_string()),
                    });
                }
            }
            if let Some(reason) = candidate.finish_reason {
                self.stop = Some(finish_reason(&reason, self.calls > 0));
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Event>) {
        // No end event: a stream that reached its finish reason is complete when it ends.
        if self.done || self.stop.is_none() {
            return;
        }
        self.done = true;
        if let Some(stop) = self.stop {
            out.push(Event::Stop(stop));
        }
        if let Some(usage) = self.usage {
            out.push(Event::Usage(usage.into_usage()));
        }
        out.push(Event::Done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::canonical::{Message, ToolDef};
    use crate::sse::SseSplitter;

    #[test]
    fn requests_are_written_as_generate_content_reads_them() {
        let request = Request {
            system: vec![Part::text("Be brief.")],
            messages: vec![
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::text("Look"),
                        Part::Image {
                            source: ImageSource::from_url("https://x.test/cat.PNG?s=1"),
                            cache: None,
                        },
                    ],
                },
                Message {
                    role: Role::Assistant,
                    parts: vec![Part::ToolCall {
                        id: "call_1".into(),
                        name: "look".into(),
                        arguments: r#"{"q":1}"#.into(),
                    }],
                },
                Message {
                    role: Role::User,
                    parts: vec![Part::ToolResult {
                        call_id: "call_1".into(),
                        content: vec![Part::text("a cat")],
                        is_error: false,
                        cache: None,
                    }],
                },
            ],
            tools: vec![ToolDef {
                name: "look".into(),
                description: None,
                parameters: json!({"type": "object", "additionalProperties": false, "properties": {"q": {"type": "integer"}}}),
                cache: None,
            }],
            tool_choice: Some(ToolChoice::Tool("look".into())),
            max_tokens: Some(100),
            stop: vec!["END".into()],
            ..Request::default()
        };
        let body: Value = serde_json::from_slice(&Gemini.encode_request(&request, "gemini-x").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Look"},
                        {"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/cat.PNG?s=1"}}]},
                    {"role": "model", "parts": [{"functionCall": {"name": "look", "args": {"q": 1}}}]},
                    {"role": "user", "parts": [{"functionResponse": {"name": "look", "response": {"content": "a cat"}}}]}
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "tools": [{"functionDeclarations": [{"name": "look", "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}}}]}],
                "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["look"]}},
                "generationConfig": {"maxOutputTokens": 100, "stopSequences": ["END"]}
            })
        );
        assert_eq!(
            Gemini.chat_target("/v1beta", "gemini-2.5-flash", true),
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            Gemini.chat_target("/v1beta", "../x?y", false),
            "/v1beta/models/..%2Fx%3Fy:generateContent"
        );
    }

    #[test]
    fn a_whole_answer_decodes_with_thinking_and_cache_usage() {
        let body = br#"{"candidates": [{"content": {"parts": [{"text": "hmm", "thought": true}, {"text": "Hi "},
            {"functionCall": {"name": "look", "args": {"q": "cat"}}}], "role": "model"}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20, "totalTokenCount": 150,
                              "cachedContentTokenCount": 60, "thoughtsTokenCount": 30},
            "modelVersion": "gemini-x", "responseId": "resp-1"}"#;
        let answer = Gemini.decode_answer(body).unwrap();
        assert_eq!(answer.text(), "Hi ");
        assert!(
            matches!(&answer.parts[1], Part::ToolCall { name, arguments, .. } if name == "look" && arguments == r#"{"q":"cat"}"#)
        );
        assert_eq!(answer.stop, Some(StopReason::ToolCalls));
        assert_eq!(
            answer.usage,
            Some(Usage {
                input_tokens: 100,
                cached_input_tokens: 60,
                output_tokens: 50,
                reasoning_tokens: 30,
                ..Usage::default()
            })
        );
    }

    const STREAM: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hel\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 9,\"totalTokenCount\": 9},\"modelVersion\": \"gemini-x\",\"responseId\": \"r1\"}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"lo \\u00e9\"}],\"role\": \"model\"},\"index\": 0}],\"modelVersion\": \"gemini-x\",\"responseId\": \"r1\"}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"look\",\"args\": {\"q\": 1}}}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 9,\"candidatesTokenCount\": 4,\"totalTokenCount\": 13},\"modelVersion\": \"gemini-x\",\"responseId\": \"r1\"}\r\n\r\n";

    fn decode_split(bytes: &[u8], cut: usize) -> Vec<Event> {
        let mut splitter = SseSplitter::new();
        let mut decoder = Gemini.stream_decoder();
        let mut out = Vec::new();
        for piece in [&bytes[..cut], &bytes[cut..]] {
            splitter.push(piece);
            while let Some(event) = splitter.next_event() {
                decoder.decode(&SseEvent::parse(&event), &mut out).unwrap();
            }
        }
        decoder.finish(&mut out);
        out
    }

    #[test]
    fn a_stream_decodes_the_same_split_at_every_byte_and_ends_at_its_end() {
        let whole = decode_split(STREAM.as_bytes(), 0);
        assert_eq!(
            whole,
            [
                Event::Start { id: "r1".into() },
                Event::Text("Hel".into()),
                Event::Text("lo é".into()),
                Event::ToolCallStart {
                    index: 0,
                    id: "call_r1_0".into(),
                    name: "look".into()
                },
                Event::ToolCallArguments {
                    index: 0,
                    fragment: r#"{"q":1}"#.into()
                },
                Event::Stop(StopReason::ToolCalls),
                Event::Usage(Usage {
                    input_tokens: 9,
                    output_tokens: 4,
                    ..Usage::default()
                }),
                Event::Done,
            ]
        );
        for cut in 1..STREAM.len() {
            assert_eq!(decode_split(STREAM.as_bytes(), cut), whole, "split at {cut}");
        }
        // Cut before its finish reason, a stream is not complete.
        let first = STREAM.split("\r\n\r\n").next().unwrap();
        let partial = decode_split(format!("{first}\r\n\r\n").as_bytes(), 0);
        assert!(!partial.contains(&Event::Done), "{partial:?}");
    }

    #[test]
    fn errors_keep_their_meaning() {
        let body = br#"{"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}"#;
        let e = Gemini.decode_error(429, body);
        assert_eq!(
            (e.status(), e.message.as_str()),
            (429, "Resource has been exhausted (e.g. check quota).")
        );
        let mut decoder = Gemini.stream_decoder();
        let mut out = Vec::new();
        decoder
            .decode(&SseEvent::parse(b"data: {\"error\": {\"code\": 503, \"message\": \"overloaded\", \"status\": \"UNAVAILABLE\"}}\r\n\r\n"), &mut out)
            .unwrap();
        assert_eq!(
            out,
            [Event::Error {
                status: 503,
                message: "overloaded".into()
            }]
        );
    }
}
