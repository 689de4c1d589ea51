//! The parsed chat request.
//!
//! The body is parsed once. The original bytes are kept and forwarded untouched unless a plugin
//! or the router changes a top-level field; then only the changed fields are re-serialized and the
//! rest is copied from the original as raw JSON. A 2 MiB prompt therefore costs one validation
//! pass and at most one memcpy, never a re-encoding of the messages.

use crate::api_error::{ApiError, ErrorKind};
use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// Why a body is not a valid chat request. Converted to a 400 in the client's format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestParseError {
    #[error("{0}")]
    Json(String),
    #[error("the request body must be a JSON object")]
    NotAnObject,
    #[error("you must provide a `{0}` parameter")]
    Missing(&'static str),
    #[error("invalid value for `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the body repeats the key `{0}`; send each key once")]
    DuplicateKey(String),
}

impl From<RequestParseError> for ApiError {
    fn from(e: RequestParseError) -> Self {
        match e {
            RequestParseError::Json(detail) => ApiError::malformed_json(detail),
            RequestParseError::NotAnObject => {
                ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_code("invalid_json")
            }
            RequestParseError::Missing(field) | RequestParseError::Invalid { field, .. } => {
                ApiError::new(ErrorKind::InvalidRequest, e.to_string())
                    .with_code("invalid_request")
                    .with_param(field)
            }
            RequestParseError::DuplicateKey(_) => {
                ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_code("duplicate_key")
            }
        }
    }
}

/// One message of the conversation, reduced to what policies need: its role and its text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatMessage {
    pub role: String,
    /// All text parts joined with newlines.
    pub text: String,
}

/// A chat completion request (OpenAI's shape, the gateway's canonical model).
#[derive(Debug, Clone)]
pub struct ChatRequest {
    raw: Bytes,
    /// Top-level keys in their original order, with the byte range of each value in `raw`.
    fields: Vec<(Box<str>, Range<usize>)>,
    /// Top-level fields replaced or added since parsing, as JSON text.
    overrides: Vec<(Box<str>, String)>,
    /// The model as the client named it.
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The larger of `max_completion_tokens` and the older `max_tokens` (a provider may honour
    /// either, so holds and limits assume the larger).
    pub max_tokens: Option<u64>,
    /// Answers asked for (OpenAI's `n`, 1 when absent): each may use `max_tokens`.
    pub choices: u64,
    /// OpenAI's `user` (an end-user id the client chose), validated: it reaches the usage log.
    pub user: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub has_tools: bool,
    pub has_images: bool,
}

impl ChatRequest {
    /// Parse an OpenAI chat completions body.
    pub fn parse(raw: Bytes) -> Result<ChatRequest, RequestParseError> {
        let top: TopLevel<'_> = match serde_json::from_slice(&raw) {
            Ok(top) => top,
            Err(e) if e.is_data() => return Err(RequestParseError::NotAnObject),
            Err(e) => return Err(RequestParseError::Json(e.to_string())),
        };
        let base = raw.as_ptr() as usize;
        let mut req = ChatRequest {
            raw: Bytes::new(),
            fields: Vec::with_capacity(top.0.len()),
            overrides: Vec::new(),
            model: String::new(),
            stream: false,
            include_usage: false,
            max_tokens: None,
            choices: 1,
            user: None,
            messages: Vec::new(),
            has_tools: false,
            has_images: false,
        };
        if let Some(key) = first_duplicate(&top.0) {
            return Err(RequestParseError::DuplicateKey(client_text_excerpt(key)));
        }
        let mut seen_model = false;
        let mut seen_messages = false;
        for (key, value) in top.0 {
            let text = value.get();
            let start = text.as_ptr() as usize - base;
            match key.as_ref() {
                "model" => {
                    req.model = typed(text, "model")?;
                    check_client_text("model", &req.model, MAX_MODEL_BYTES)?;
                    seen_model = true;
                }
                "user" => {
                    req.user = typed::<Option<String>>(text, "user")?;
                    if let Some(user) = &req.user {
                        check_client_text("user", user, MAX_USER_BYTES)?;
                    }
                }
                "metadata" => check_metadata(text)?,
                "stream" => req.stream = typed::<Option<bool>>(text, "stream")?.unwrap_or(false),
                "stream_options" => {
                    let opts: Option<StreamOptions> = typed(text, "stream_options")?;
                    req.include_usage = opts.and_then(|o| o.include_usage).unwrap_or(false);
                }
                "n" => req.choices = typed::<Option<u64>>(text, "n")?.unwrap_or(1).max(1),
                "max_tokens" | "max_completion_tokens" => {
                    if let Some(n) = typed::<Option<u64>>(text, "max_tokens")? {
                        req.max_tokens = Some(req.max_tokens.map_or(n, |m| m.max(n)));
                    }
                }
                "messages" => {
                    let wire: Vec<WireMessage<'_>> = typed(text, "messages")?;
                    req.messages.reserve(wire.len());
                    for m in wire {
                        let (text, images) = m.content.map(content_text).transpose()?.unwrap_or_default();
                        req.has_images |= images;
                        req.messages.push(ChatMessage {
                            role: m.role.into_owned(),
                            text,
                        });
                    }
                    seen_messages = true;
                }
                "tools" | "functions" => req.has_tools |= text != "null" && text != "[]",
                _ => {}
            }
            req.fields.push((key.into(), start..start + text.len()));
        }
        if !seen_model || req.model.is_empty() {
            return Err(RequestParseError::Missing("model"));
        }
        if !seen_messages {
            return Err(RequestParseError::Missing("messages"));
        }
        req.raw = raw;
        Ok(req)
    }

    /// The body exactly as the client sent it.
    pub fn original_body(&self) -> &Bytes {
        &self.raw
    }

    /// The raw JSON of a top-level field as currently set (override first, then original).
    pub fn field(&self, key: &str) -> Option<&str> {
        if let Some((_, v)) = self.overrides.iter().find(|(k, _)| k.as_ref() == key) {
            return Some(v);
        }
        let (_, range) = self.fields.iter().find(|(k, _)| k.as_ref() == key)?;
        std::str::from_utf8(&self.raw[range.clone()]).ok()
    }

    /// Replace (or add) a top-level field with the given JSON text.
    pub fn set_field(&mut self, key: &str, json: String) {
        match self.overrides.iter_mut().find(|(k, _)| k.as_ref() == key) {
            Some((_, v)) => *v = json,
            None => self.overrides.push((key.into(), json)),
        }
    }

    /// Set the model sent upstream (the client's `model` stays in [`ChatRequest::model`]).
    pub fn set_upstream_model(&mut self, model: &str) {
        if model != self.model || self.overrides.iter().any(|(k, _)| k.as_ref() == "model") {
            self.set_field("model", json_string(model));
        }
    }

    /// Make the upstream send its usage chunk (`ask`), whatever the client asked, keeping any
    /// other `stream_options` the client set; or send the client's own `stream_options` (for a
    /// provider that refuses the field).
    pub fn request_upstream_usage(&mut self, ask: bool) {
        if !ask {
            self.overrides.retain(|(k, _)| k.as_ref() != "stream_options");
            return;
        }
        if !self.stream || self.include_usage || self.overrides.iter().any(|(k, _)| k.as_ref() == "stream_options") {
            return;
        }
        // The client's other options are copied as raw JSON, like the body's fields: re-encoding
        // them through `serde_json::Value` could change a float in its last digit, and would
        // drop them all for a number outside `f64`'s range.
        let mut json = String::from("{");
        if let Some(TopLevel(members)) = self.field("stream_options").and_then(|t| serde_json::from_str(t).ok()) {
            for (key, value) in members.iter().filter(|(k, _)| k != "include_usage") {
                json.push_str(&json_string(key));
                json.push(':');
                json.push_str(value.get());
                json.push(',');
            }
        }
        json.push_str("\"include_usage\":true}");
        self.set_field("stream_options", json);
    }

    /// The body to send upstream: the original bytes when nothing changed, otherwise the
    /// original fields spliced with the overrides.
    pub fn upstream_body(&self) -> Bytes {
        if self.overrides.is_empty() {
            return self.raw.clone();
        }
        let extra: usize = self.overrides.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let mut out = Vec::with_capacity(self.raw.len() + extra);
        out.push(b'{');
        let mut first = true;
        let mut put = |out: &mut Vec<u8>, key: &str, value: &[u8]| {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(json_string(key).as_bytes());
            out.push(b':');
            out.extend_from_slice(value);
        };
        for (key, range) in &self.fields {
            match self.overrides.iter().find(|(k, _)| k == key) {
                Some((_, v)) => put(&mut out, key, v.as_bytes()),
                None => put(&mut out, key, &self.raw[range.clone()]),
            }
        }
        for (key, v) in &self.overrides {
            if !self.fields.iter().any(|(k, _)| k == key) {
                put(&mut out, key, v.as_bytes());
            }
        }
        out.push(b'}');
        Bytes::from(out)
    }

    /// All message text, for classifiers and token estimates.
    pub fn prompt_text(&self) -> impl Iterator<Item = &str> {
        self.messages.iter().map(|m| m.text.as_str())
    }

    /// The text of the last user message (what a task classifier looks at first).
    pub fn last_user_text(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.text.as_str())
    }
}

/// Longest `model` accepted. Real model ids are well under 100 bytes; the cap keeps a hostile
/// name out of headers, logs, metrics and the usage log.
pub const MAX_MODEL_BYTES: usize = 256;
/// Longest `user` accepted.
pub const MAX_USER_BYTES: usize = 256;
/// OpenAI's limits on `metadata`: 16 pairs, keys of 64 characters, values of 512.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

/// A client string that reaches the usage log, headers or logs: not empty, at most `max` bytes,
/// no control characters (NUL among them, which PostgreSQL refuses in text). Invalid UTF-8 and
/// lone surrogates never get this far: the JSON parser refuses them.
pub fn check_client_text(field: &'static str, value: &str, max: usize) -> Result<(), RequestParseError> {
    let reason = if value.is_empty() {
        "must not be empty".to_owned()
    } else if value.len() > max {
        format!("must be at most {max} bytes (got {})", value.len())
    } else if value.chars().any(char::is_control) {
        "must not contain control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(RequestParseError::Invalid { field, reason })
}

fn check_metadata(text: &str) -> Result<(), RequestParseError> {
    let invalid = |reason: String| RequestParseError::Invalid {
        field: "metadata",
        reason,
    };
    let Some(pairs) = typed::<Option<serde_json::Map<String, serde_json::Value>>>(text, "metadata")? else {
        return Ok(());
    };
    if pairs.len() > METADATA_PAIRS {
        return Err(invalid(format!("at most {METADATA_PAIRS} pairs")));
    }
    for (key, value) in &pairs {
        let serde_json::Value::String(value) = value else {
            return Err(invalid("values must be strings".into()));
        };
        if key.chars().count() > METADATA_KEY_CHARS || key.chars().any(char::is_control) {
            return Err(invalid(format!(
                "keys must be at most {METADATA_KEY_CHARS} characters, without control characters"
            )));
        }
        if value.chars().count() > METADATA_VALUE_CHARS || value.chars().any(char::is_control) {
            return Err(invalid(format!(
                "values must be at most {METADATA_VALUE_CHARS} characters, without control characters"
            )));
        }
    }
    Ok(())
}

/// The first top-level key that occurs twice. Parsers disagree on which copy wins (serde keeps
/// the last, others the first), so a body with both would let the gateway hold and limit on one
/// value while the provider honours the other.
fn first_duplicate<'a>(fields: &'a [(Cow<'a, str>, &'a RawValue)]) -> Option<&'a str> {
    // A body has a dozen keys: comparing pairs costs less than sorting a copy. A hostile body
    // with thousands of keys is sorted instead, so the check stays O(n log n).
    if fields.len() > 32 {
        let mut keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_ref()).collect();
        keys.sort_unstable();
        return keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
    }
    fields.iter().enumerate().find_map(|(i, (key, _))| {
        fields[i + 1..]
            .iter()
            .any(|(other, _)| other == key)
            .then_some(key.as_ref())
    })
}

/// A client string fit to quote in an error message: control characters replaced, at most 64
/// characters.
fn client_text_excerpt(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if s.chars().nth(64).is_some() {
        out.push('…');
    }
    out
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn typed<'a, T: Deserialize<'a>>(text: &'a str, field: &'static str) -> Result<T, RequestParseError> {
    serde_json::from_str(text).map_err(|e| RequestParseError::Invalid {
        field,
        reason: e.to_string(),
    })
}

/// The text of a message's `content` (a string, or an array of parts) and whether it has images.
fn content_text(raw: &RawValue) -> Result<(String, bool), RequestParseError> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => Ok((typed(text, "messages")?, false)),
        Some(b'[') => {
            let parts: Vec<WirePart<'_>> = typed(text, "messages")?;
            let mut out = String::new();
            let mut images = false;
            for part in parts {
                match part.text {
                    Some(t) => {
                        if !out.is_empty() {
                            out.push('\n');
                        }
                        out.push_str(&t);
                    }
                    None => images |= part.kind.contains("image"),
                }
            }
            Ok((out, images))
        }
        Some(b'n') => Ok((String::new(), false)),
        _ => Err(RequestParseError::Invalid {
            field: "messages",
            reason: "`content` must be a string or an array of content parts".into(),
        }),
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct WireMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WirePart<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(default)]
    text: Option<String>,
}

/// The top-level object as (key, raw value) pairs in document order.
struct TopLevel<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value = map.next_value::<&'de RawValue>()?;
                    out.push((key, value));
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ChatRequest, RequestParseError> {
        ChatRequest::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn parses_the_fields_policies_need() {
        let r = parse(
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},
               "max_tokens":50,"max_completion_tokens":40,
               "messages":[{"role":"system","content":"be brief"},
                           {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"x"}}]}],
               "tools":[{"type":"function"}]}"#,
        )
        .unwrap();
        assert_eq!(r.model, "gpt-4o-mini");
        assert!(r.stream && r.include_usage && r.has_tools && r.has_images);
        assert_eq!(r.max_tokens, Some(50), "the larger of the two caps");
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.last_user_text(), Some("hi"));
    }

    #[test]
    fn unchanged_body_is_forwarded_byte_for_byte() {
        let body = r#"{ "model" : "m", "messages": [], "x-vendor": {"a":1} }"#;
        let r = parse(body).unwrap();
        assert_eq!(r.upstream_body().as_ref(), body.as_bytes());
    }

    #[test]
    fn overrides_splice_into_the_original_fields() {
        let r0 = r#"{"model":"auto","stream":true,"stream_options":{"foo":1},"messages":[{"role":"user","content":"q"}],"seed":7}"#;
        let mut r = parse(r0).unwrap();
        r.set_upstream_model("gpt-4o");
        r.request_upstream_usage(true);
        let v: serde_json::Value = serde_json::from_slice(&r.upstream_body()).unwrap();
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["foo"], 1);
        assert_eq!(v["seed"], 7);
        assert_eq!(v["messages"][0]["content"], "q");
        assert_eq!(r.model, "auto", "the client's model is kept for the usage record");
    }

    #[test]
    fn the_clients_other_stream_options_are_copied_as_sent() {
        let body = r#"{"model":"m","stream":true,"stream_options":{"x":-7.676878446884917e+186,"big":1e400,"include_usage":false},"messages":[]}"#;
        let mut r = parse(body).unwrap();
        r.request_upstream_usage(true);
        assert_eq!(
            r.field("stream_options"),
            Some(r#"{"x":-7.676878446884917e+186,"big":1e400,"include_usage":true}"#)
        );
        assert!(
            parse(std::str::from_utf8(&r.upstream_body()).unwrap())
                .unwrap()
                .include_usage
        );
    }

    #[test]
    fn missing_usage_request_adds_stream_options() {
        let mut r = parse(r#"{"model":"m","stream":true,"messages":[]}"#).unwrap();
        r.request_upstream_usage(true);
        let v: serde_json::Value = serde_json::from_slice(&r.upstream_body()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(!r.include_usage);
    }

    #[test]
    fn errors_are_specific() {
        assert!(matches!(parse("{"), Err(RequestParseError::Json(_))));
        assert_eq!(parse("[1]").unwrap_err(), RequestParseError::NotAnObject);
        assert_eq!(
            parse(r#"{"messages":[]}"#).unwrap_err(),
            RequestParseError::Missing("model")
        );
        assert_eq!(
            parse(r#"{"model":"m"}"#).unwrap_err(),
            RequestParseError::Missing("messages")
        );
        assert!(matches!(
            parse(r#"{"model":1,"messages":[]}"#),
            Err(RequestParseError::Invalid { field: "model", .. })
        ));
        let api: ApiError = parse("{").unwrap_err().into();
        assert_eq!(api.status(), 400);
    }

    #[test]
    fn client_strings_that_reach_the_usage_log_are_checked_at_the_edge() {
        let model = |m: &str| parse(&format!(r#"{{"model":{m},"messages":[]}}"#));
        let field = |r: Result<ChatRequest, RequestParseError>| match r {
            Err(RequestParseError::Invalid { field, .. }) => Some(field),
            _ => None,
        };
        assert_eq!(field(model(r#""gpt\u0000x""#)), Some("model"), "NUL");
        assert_eq!(field(model(r#""gpt\u001bx""#)), Some("model"), "ESC");
        assert_eq!(field(model(r#""gpt\u0085x""#)), Some("model"), "C1 control");
        assert_eq!(field(model(r#""\ud800""#)), Some("model"), "lone surrogate");
        assert_eq!(field(model(&format!("\"{}\"", "m".repeat(64 * 1024)))), Some("model"));
        assert!(model(&format!("\"{}\"", "m".repeat(MAX_MODEL_BYTES))).is_ok());
        assert!(model(r#""openai/gpt-4o-mini""#).is_ok());

        let with = |extra: &str| parse(&format!(r#"{{"model":"m","messages":[],{extra}}}"#));
        assert_eq!(
            with(r#""user":"end-user-7""#).unwrap().user.as_deref(),
            Some("end-user-7")
        );
        assert_eq!(field(with(r#""user":"a\u0000""#)), Some("user"));
        assert_eq!(field(with(&format!(r#""user":"{}""#, "u".repeat(300)))), Some("user"));
        assert!(with(r#""metadata":{"team":"core"}"#).is_ok());
        assert!(with(r#""metadata":null"#).is_ok());
        assert_eq!(field(with(r#""metadata":{"team":1}"#)), Some("metadata"));
        assert_eq!(field(with(r#""metadata":{"t":"a\u0000"}"#)), Some("metadata"));
        let many: Vec<String> = (0..17).map(|i| format!(r#""k{i}":"v""#)).collect();
        assert_eq!(
            field(with(&format!(r#""metadata":{{{}}}"#, many.join(",")))),
            Some("metadata")
        );
        let api: ApiError = model(r#""gpt\u0000x""#).unwrap_err().into();
        assert_eq!((api.status(), api.param), (400, Some("model")));
        assert!(!api.message.contains('\0'), "the message never quotes the bad value");
    }

    #[test]
    fn duplicate_keys_are_refused_and_the_larger_token_cap_holds() {
        let dup = parse(r#"{"model":"m","max_tokens":1,"messages":[],"max_tokens":100000}"#);
        assert_eq!(dup.unwrap_err(), RequestParseError::DuplicateKey("max_tokens".into()));
        let api: ApiError = parse(r#"{"model":"a","model":"b","messages":[]}"#).unwrap_err().into();
        assert_eq!((api.status(), api.code), (400, Some("duplicate_key")));
        // Many keys: still found, without quadratic work.
        let keys: Vec<String> = (0..5000).map(|i| format!(r#""k{i}":1"#)).collect();
        let body = format!(r#"{{"model":"m","messages":[],{},"k17":2}}"#, keys.join(","));
        assert_eq!(parse(&body).unwrap_err(), RequestParseError::DuplicateKey("k17".into()));
        // Nested objects keep serde's own duplicate check.
        assert!(parse(r#"{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}"#).is_err());

        let n = parse(r#"{"model":"m","n":3,"messages":[]}"#).unwrap();
        assert_eq!(n.choices, 3, "each of n answers may use max_tokens");
        assert_eq!(parse(r#"{"model":"m","messages":[]}"#).unwrap().choices, 1);
        let both = parse(r#"{"model":"m","max_tokens":100000,"max_completion_tokens":1,"messages":[]}"#).unwrap();
        assert_eq!(both.max_tokens, Some(100000));
    }
}
