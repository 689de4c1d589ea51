//! Metering an OpenAI stream event by event, on the relay's path.
//!
//! The gateway always asks the provider for the usage chunk (`stream_options.include_usage`).
//! When the client did not ask for it, the relay must hand the client exactly what the provider
//! would have sent without it: the usage chunk is dropped and the `"usage":null` member the
//! provider adds to every other chunk is cut out. Events are kept (zero-copy) until usage is
//! seen, so that a stream cut short can still be counted.

use super::tokens::count_text;
use super::OpenAiUsage;
use bytes::{Bytes, BytesMut};
use komilion_sdk::Usage;
use memchr::memmem;

#[derive(Debug, Default)]
pub struct StreamMeter {
    /// The usage chunk was requested on the client's behalf: remove it from what they get.
    strip: bool,
    pub usage: Option<Usage>,
    /// Events seen before usage, to count delivered output if the stream ends without it.
    delivered: Vec<Bytes>,
}

const USAGE_OBJECT: &[u8] = b"\"usage\":{";
const USAGE_NULL: &[u8] = b"\"usage\":null";

impl StreamMeter {
    pub fn new(strip: bool) -> StreamMeter {
        StreamMeter {
            strip,
            usage: None,
            delivered: Vec::new(),
        }
    }

    /// Look at one complete SSE event; returns what to send the client for it.
    pub fn inspect(&mut self, event: Bytes) -> Option<Bytes> {
        if memmem::find(&event, USAGE_OBJECT).is_some() {
            if let Some(chunk) = data_json::<UsageChunk>(&event) {
                if let Some(usage) = chunk.usage {
                    self.usage = Some(usage.into());
                    self.delivered.clear();
                }
                let usage_only = chunk.choices.is_some_and(|c| c.is_empty());
                if self.strip && usage_only {
                    return None;
                }
            }
        }
        if self.usage.is_none() {
            self.delivered.push(event.clone());
        }
        if self.strip && memmem::find(&event, USAGE_NULL).is_some() {
            return Some(cut_usage_null(&event));
        }
        Some(event)
    }

    /// Output tokens delivered so far, counted with the model's tokenizer (for a stream that
    /// ended without usage).
    pub fn estimate_output(&self, model: &str) -> u64 {
        let mut text = String::new();
        for event in &self.delivered {
            let Some(json) = data_json::<serde_json::Value>(event) else {
                continue;
            };
            for choice in json["choices"].as_array().into_iter().flatten() {
                let delta = &choice["delta"];
                if let Some(t) = delta["content"].as_str() {
                    text.push_str(t);
                }
                if let Some(t) = delta["reasoning_content"].as_str() {
                    text.push_str(t);
                }
                for call in delta["tool_calls"].as_array().into_iter().flatten() {
                    if let Some(t) = call["function"]["name"].as_str() {
                        text.push_str(t);
                    }
                    if let Some(t) = call["function"]["arguments"].as_str() {
                        text.push_str(t);
                    }
                }
            }
        }
        if text.is_empty() {
            0
        } else {
            count_text(model, &text)
        }
    }
}

/// What the meter needs of a chunk that carries usage.
#[derive(serde::Deserialize)]
struct UsageChunk {
    usage: Option<OpenAiUsage>,
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

/// The JSON of an event's `data:` line(s), read as `T`, if it is that.
fn data_json<T: serde::de::DeserializeOwned>(event: &[u8]) -> Option<T> {
    let parsed = crate::sse::SseEvent::parse(event);
    serde_json::from_str(&parsed.data).ok()
}

/// The event without its `"usage":null` member (and the comma that joined it). The pattern
/// cannot occur inside a JSON string, where quotes are escaped.
fn cut_usage_null(event: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(event.len());
    let mut rest = event;
    while let Some(i) = memmem::find(rest, USAGE_NULL) {
        let (mut head, mut tail) = (&rest[..i], &rest[i + USAGE_NULL.len()..]);
        if head.last() == Some(&b',') {
            head = &head[..head.len() - 1];
        } else if tail.first() == Some(&b',') {
            tail = &tail[1..];
        }
        out.extend_from_slice(head);
        rest = tail;
    }
    out.extend_from_slice(rest);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_what_the_client_did_not_ask_for() {
        let mut m = StreamMeter::new(true);
        let chunk = Bytes::from_static(
            b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        );
        assert_eq!(
            &m.inspect(chunk).unwrap()[..],
            b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"
        );
        let first = Bytes::from_static(b"data: {\"usage\":null,\"id\":\"c\"}\n\n");
        assert_eq!(&m.inspect(first).unwrap()[..], b"data: {\"id\":\"c\"}\n\n");
        let usage = Bytes::from_static(
            b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
        );
        assert_eq!(m.inspect(usage), None);
        assert_eq!(m.usage.unwrap().input_tokens, 9);
        let done = Bytes::from_static(b"data: [DONE]\n\n");
        assert_eq!(m.inspect(done.clone()).unwrap(), done);
    }

    #[test]
    fn passes_everything_when_the_client_asked() {
        let mut m = StreamMeter::new(false);
        let usage =
            Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n");
        let out = m.inspect(usage.clone()).unwrap();
        assert_eq!(out.as_ptr(), usage.as_ptr(), "unchanged events are not copied");
        assert!(m.usage.is_some());
    }

    #[test]
    fn estimates_delivered_output() {
        let mut m = StreamMeter::new(true);
        for piece in ["Hello", ",", " world", "!"] {
            let e = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{piece}\"}}}}],\"usage\":null}}\n\n"
            );
            m.inspect(Bytes::from(e));
        }
        assert_eq!(m.usage, None);
        assert_eq!(
            m.estimate_output("gpt-4o-mini"),
            count_text("gpt-4o-mini", "Hello, world!")
        );
    }
}
