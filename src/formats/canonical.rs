//! The canonical request, answer and stream event that every surface and every provider
//! translate to and from (DESIGN.md §3).
//!
//! It carries what any surface carries: a system prompt, content parts (text, images), tool
//! definitions, tool calls and their results, prompt-cache markers, stop reasons and usage
//! (cached, cache-written and reasoning tokens included). Only requests that cross formats are
//! decoded into it: OpenAI in, OpenAI-compatible out stays a byte splice of the client's body.

use komilion_sdk::Usage;
use serde_json::Value;

/// A chat request in no provider's format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// The system prompt, as blocks (a cache marker may sit on any of them).
    pub system: Vec<Part>,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolDef>,
    pub tool_choice: Option<ToolChoice>,
    /// Most output tokens to generate; a provider that requires it gets its default.
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Ask for JSON output (OpenAI's `response_format: json_object` or a schema).
    pub json_output: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text {
        text: String,
        cache: Option<CacheMarker>,
    },
    Image {
        source: ImageSource,
        cache: Option<CacheMarker>,
    },
    /// The assistant calls a tool; `arguments` is a JSON object as text.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
    /// The result of a tool call, sent back by the user side.
    ToolResult {
        call_id: String,
        /// Text and images.
        content: Vec<Part>,
        is_error: bool,
        cache: Option<CacheMarker>,
    },
}

impl Part {
    pub fn text(text: impl Into<String>) -> Part {
        Part::Text {
            text: text.into(),
            cache: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Url(String),
    Base64 { media_type: String, data: String },
}

impl ImageSource {
    /// A `data:` URL becomes inline data; any other URL stays a URL.
    pub fn from_url(url: &str) -> ImageSource {
        if let Some(rest) = url.strip_prefix("data:") {
            if let Some((media_type, data)) = rest.split_once(";base64,") {
                return ImageSource::Base64 {
                    media_type: media_type.to_owned(),
                    data: data.to_owned(),
                };
            }
        }
        ImageSource::Url(url.to_owned())
    }

    pub fn to_url(&self) -> String {
        match self {
            ImageSource::Url(url) => url.clone(),
            ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        }
    }
}

/// A prompt-cache breakpoint (Anthropic's `cache_control: {"type": "ephemeral", "ttl"}`): the
/// prompt up to and including the marked block is cached.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheMarker {
    /// `5m` or `1h`; the provider's default when absent.
    pub ttl: Option<String>,
}

impl CacheMarker {
    /// A `cache_control` member, if it asks for caching.
    pub fn from_json(value: &Value) -> Option<CacheMarker> {
        (value.get("type")?.as_str()? == "ephemeral").then(|| CacheMarker {
            ttl: value.get("ttl").and_then(Value::as_str).map(str::to_owned),
        })
    }

    pub fn to_json(&self) -> Value {
        match &self.ttl {
            Some(ttl) => serde_json::json!({"type": "ephemeral", "ttl": ttl}),
            None => serde_json::json!({"type": "ephemeral"}),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the arguments.
    pub parameters: Value,
    pub cache: Option<CacheMarker>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    /// Some tool must be called.
    Required,
    None,
    /// This tool must be called.
    Tool(String),
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A natural end or a stop sequence.
    Stop,
    /// The token limit.
    Length,
    ToolCalls,
    ContentFilter,
}

impl StopReason {
    /// OpenAI's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            StopReason::Stop => "stop",
            StopReason::Length => "length",
            StopReason::ToolCalls => "tool_calls",
            StopReason::ContentFilter => "content_filter",
        }
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The provider's id for it.
    pub id: String,
    /// Text and tool calls, in order.
    pub parts: Vec<Part>,
    pub stop: Option<StopReason>,
    pub usage: Option<Usage>,
}

impl Answer {
    /// All text of the answer.
    pub fn text(&self) -> String {
        texts(&self.parts).collect()
    }
}

/// The text parts among `parts`, in order.
pub fn texts(parts: &[Part]) -> impl Iterator<Item = &str> {
    parts.iter().filter_map(|p| match p {
        Part::Text { text, .. } => Some(text.as_str()),
        _ => None,
    })
}

/// One step of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The answer began; the provider's id for it.
    Start {
        id: String,
    },
    Text(String),
    /// Tool call number `index` (from 0, in the answer's order) begins.
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of tool call `index`'s arguments (JSON text, in pieces).
    ToolCallArguments {
        index: usize,
        fragment: String,
    },
    Stop(StopReason),
    /// The answer's usage (complete: the provider's final figures).
    Usage(Usage),
    /// The provider reported an error in the stream; `status` is the HTTP status it stands for.
    Error {
        status: u16,
        message: String,
    },
    /// The provider's last event: nothing follows.
    Done,
}
