//! Metering an OpenAI stream event by event, on the relay's path.
//!
//! Every event's data is parsed as JSON (structurally: any whitespace, any key order), so that
//! - the usage chunk the gateway asked for on the client's behalf is found, read, and, when the
//!   client did not ask for it, dropped; the `"usage": null` member the provider then adds to
//!   every other chunk is removed too, so the client gets what the provider would have sent it;
//! - a malformed event is caught: the relay ends the client's stream with an error event rather
//!   than pass on something the client's SDK cannot parse;
//! - the output delivered so far is counted as it goes, for a stream that ends without usage
//!   (client gone, upstream reset, a provider that never reports it). The text waits in a
//!   bounded window and is tokenized a window at a time, cut where the tokenizer would cut
//!   anyway, so the count equals tokenizing the whole output at once while memory stays small
//!   and a stream whose usage arrives (the usual case) is rarely tokenized at all.

use super::tokens::{count_text, token_boundary};
use super::OpenAiUsage;
use bytes::Bytes;
use komilion_sdk::Usage;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Output text kept before it is tokenized, by default (bytes; `limits.stream_count_window_bytes`).
pub const COUNT_WINDOW: usize = 16 * 1024;

#[derive(Debug)]
pub struct StreamMeter {
    /// The usage chunk was requested on the client's behalf: remove it from what they get.
    strip: bool,
    /// The model whose tokenizer counts delivered output.
    model: String,
    pub usage: Option<Usage>,
    /// Delivered output not yet tokenized.
    window: String,
    /// Tokenize once the window holds this many bytes.
    window_bytes: usize,
    /// Tokens of the delivered output already tokenized.
    counted: u64,
}

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspected {
    /// Send these bytes (the event itself, or the event rewritten).
    Send(Bytes),
    /// Send nothing for it.
    Drop,
    /// The event is not what an OpenAI stream carries; end the stream.
    Malformed(String),
    /// An error the provider reports in the stream (`{"error": …}`): sent on after the
    /// relay masked any secret it quotes.
    Error(Bytes),
}

impl StreamMeter {
    pub fn new(strip: bool, model: &str) -> StreamMeter {
        StreamMeter::with_window(strip, model, COUNT_WINDOW)
    }

    pub fn with_window(strip: bool, model: &str, window_bytes: usize) -> StreamMeter {
        StreamMeter {
            strip,
            model: model.to_owned(),
            usage: None,
            window: String::new(),
            window_bytes,
            counted: 0,
        }
    }

    /// Look at one complete SSE event (with its blank line); returns what to send the client.
    pub fn inspect(&mut self, event: Bytes) -> Inspected {
        let parsed = crate::sse::SseEvent::parse(&event);
        let data = parsed.data.trim();
        if data.is_empty() || data == "[DONE]" {
            // Comments, keep-alives and the end marker pass as they are.
            return Inspected::Send(event);
        }
        let members: Members<'_> = match serde_json::from_str(data) {
            Ok(members) => members,
            Err(e) => {
                return Inspected::Malformed(format!("the provider sent an event that is not a JSON object ({e})"))
            }
        };
        let mut usage_member = None;
        let mut empty_choices = false;
        for (key, value) in &members.0 {
            match key.as_ref() {
                "error" => return Inspected::Error(event),
                "usage" => usage_member = Some(*value),
                "choices" => match serde_json::from_str::<Vec<Choice<'_>>>(value.get()) {
                    Ok(choices) => {
                        empty_choices = choices.is_empty();
                        for choice in choices {
                            self.deliver(choice);
                        }
                    }
                    Err(e) => return Inspected::Malformed(format!("the provider sent malformed `choices` ({e})")),
                },
                _ => {}
            }
        }
        let Some(usage) = usage_member else {
            return Inspected::Send(event);
        };
        if usage.get() != "null" {
            match serde_json::from_str::<OpenAiUsage>(usage.get()) {
                Ok(u) => self.usage = Some(u.into()),
                Err(e) => return Inspected::Malformed(format!("the provider sent a malformed `usage` ({e})")),
            }
            // The usage chunk itself (no choices): the client did not ask for it.
            if self.strip && empty_choices {
                return Inspected::Drop;
            }
            return Inspected::Send(event);
        }
        if self.strip {
            return Inspected::Send(without_usage(&event, &members));
        }
        Inspected::Send(event)
    }

    fn deliver(&mut self, choice: Choice<'_>) {
        let Some(delta) = choice.delta else { return };
        for text in [delta.content, delta.reasoning_content, delta.refusal]
            .into_iter()
            .flatten()
        {
            self.take_text(&text);
        }
        for call in delta.tool_calls.into_iter().flatten() {
            if let Some(f) = call.function {
                for text in [f.name, f.arguments].into_iter().flatten() {
                    self.take_text(&text);
                }
            }
        }
    }

    fn take_text(&mut self, text: &str) {
        if self.usage.is_some() {
            return;
        }
        self.window.push_str(text);
        if self.window.len() >= self.window_bytes {
            let cut = token_boundary(&self.window);
            self.counted += count_text(&self.model, &self.window[..cut]);
            self.window.drain(..cut);
            // One huge delta must not leave a huge buffer behind.
            if self.window.capacity() > 2 * self.window_bytes {
                self.window.shrink_to(self.window_bytes);
            }
        }
    }

    /// Output tokens delivered so far, counted with the model's tokenizer (for a stream that
    /// ended without usage).
    pub fn delivered_output_tokens(&mut self) -> u64 {
        if !self.window.is_empty() {
            self.counted += count_text(&self.model, &self.window);
            self.window.clear();
        }
        self.counted
    }

    /// Bytes of output kept for counting (never much more than [`COUNT_WINDOW`]).
    pub fn kept_bytes(&self) -> usize {
        self.window.capacity()
    }
}

/// The event rebuilt without its top-level `usage` member. Values are copied as they came;
/// other fields of the event (`event:`, `id:`) are kept; a data value spanning lines keeps its
/// lines, each with its own `data:`.
fn without_usage(event: &[u8], members: &Members<'_>) -> Bytes {
    let mut json = String::with_capacity(event.len());
    json.push('{');
    for (key, value) in members.0.iter().filter(|(k, _)| k != "usage") {
        if json.len() > 1 {
            json.push(',');
        }
        json.push_str(&serde_json::Value::String(key.to_string()).to_string());
        json.push(':');
        json.push_str(value.get());
    }
    json.push('}');
    let mut out = Vec::with_capacity(json.len() + 16);
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b":") || line.starts_with(b"data") {
            continue;
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    for line in json.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// A JSON object's members as (key, raw value), in order.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(8);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    out.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// What the meter reads of a stream chunk's choice: the delivered text.
#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(borrow, default)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(i: Inspected) -> Bytes {
        match i {
            Inspected::Send(b) => b,
            other => panic!("expected Send, got {other:?}"),
        }
    }

    fn data(event: &Bytes) -> serde_json::Value {
        let parsed = crate::sse::SseEvent::parse(event);
        serde_json::from_str(&parsed.data).unwrap()
    }

    #[test]
    fn strips_what_the_client_did_not_ask_for() {
        let mut m = StreamMeter::new(true, "gpt-4o-mini");
        let chunk = Bytes::from_static(
            b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        );
        assert_eq!(
            &send(m.inspect(chunk))[..],
            b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"
        );
        let first = Bytes::from_static(b"data: {\"usage\":null,\"id\":\"c\"}\n\n");
        assert_eq!(&send(m.inspect(first))[..], b"data: {\"id\":\"c\"}\n\n");
        let usage = Bytes::from_static(
            b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
        );
        assert_eq!(m.inspect(usage), Inspected::Drop);
        assert_eq!(m.usage.unwrap().input_tokens, 9);
        let done = Bytes::from_static(b"data: [DONE]\n\n");
        assert_eq!(send(m.inspect(done.clone())), done);
    }

    #[test]
    fn usage_is_found_by_structure_not_by_bytes() {
        // Pretty-printed, spaced, keys in another order, split over several data lines: what
        // real providers send.
        let mut m = StreamMeter::new(true, "gpt-4o-mini");
        let chunk = Bytes::from_static(
            b"data: {\ndata:   \"usage\" : null ,\ndata:   \"choices\" : [ { \"delta\" : { \"content\" : \"a \\\"usage\\\":{ b\" } } ],\ndata:   \"id\" : \"c\"\ndata: }\n\n",
        );
        let out = send(m.inspect(chunk));
        let v = data(&out);
        assert!(v.get("usage").is_none(), "{}", String::from_utf8_lossy(&out));
        assert_eq!(
            v["choices"][0]["delta"]["content"], "a \"usage\":{ b",
            "text that looks like usage stays"
        );
        assert_eq!(v["id"], "c");
        let usage = Bytes::from_static(
            b"data: {\"choices\" : [ ],\ndata: \"usage\" : { \"completion_tokens\" : 2 , \"prompt_tokens\" : 9 } }\n\n",
        );
        assert_eq!(m.inspect(usage), Inspected::Drop);
        assert_eq!(m.usage.map(|u| (u.input_tokens, u.output_tokens)), Some((9, 2)));
    }

    #[test]
    fn passes_everything_when_the_client_asked() {
        let mut m = StreamMeter::new(false, "gpt-4o-mini");
        let usage =
            Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n");
        let out = send(m.inspect(usage.clone()));
        assert_eq!(out.as_ptr(), usage.as_ptr(), "unchanged events are not copied");
        assert!(m.usage.is_some());
    }

    #[test]
    fn a_malformed_event_is_caught() {
        let mut m = StreamMeter::new(false, "gpt-4o-mini");
        for bad in [
            &b"data: {\"id\": \"chatcmpl-broken\", \"choices\": [\n\n"[..],
            b"data: [1,2]\n\n",
            b"data: {\"choices\":{\"x\":1}}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":\"many\"}}\n\n",
        ] {
            assert!(
                matches!(m.inspect(Bytes::copy_from_slice(bad)), Inspected::Malformed(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            m.inspect(Bytes::from_static(b": keep-alive\n\n")),
            Inspected::Send(_)
        ));
    }

    #[test]
    fn delivered_output_is_counted_as_it_goes_within_a_small_window() {
        let mut m = StreamMeter::new(true, "gpt-4o-mini");
        let mut text = String::new();
        for i in 0..20_000 {
            let piece = match i % 4 {
                0 => " Hello",
                1 => ",",
                2 => " wörld",
                _ => "!\n",
            };
            text.push_str(piece);
            let e = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{piece:?}}}}}],\"usage\":null}}\n\n"
            );
            m.inspect(Bytes::from(e));
            assert!(m.kept_bytes() < 4 * COUNT_WINDOW, "the window stays small");
        }
        assert_eq!(m.usage, None);
        let exact = super::super::tokens::encoding_for("gpt-4o-mini")
            .encode_ordinary(&text)
            .len() as u64;
        assert_eq!(m.delivered_output_tokens(), exact);
    }

    #[test]
    fn tool_call_arguments_count_as_output() {
        let mut m = StreamMeter::new(true, "gpt-4o-mini");
        m.inspect(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\":\"}}]}}]}\n\n",
        ));
        assert_eq!(
            m.delivered_output_tokens(),
            count_text("gpt-4o-mini", "get_weather{\"city\":")
        );
    }
}
