//! A provider's stream turned into the client's surface as it arrives: upstream SSE bytes are
//! split into events, decoded by the provider's [`StreamDecoder`] and written by the surface's
//! encoder. What comes out is a well-formed OpenAI stream that the relay meters and forwards
//! like any other, so the limits on a stream (event size, memory, error scrubbing) hold for
//! every provider alike.

use super::{ProviderAdapter, StreamDecoder};
use crate::formats::canonical::Event;
use crate::formats::openai_chat::StreamEncoder;
use crate::sse::{SseEvent, SseSplitter};
use komilion_sdk::Usage;

/// Why a translated stream cannot go on.
#[derive(Debug, PartialEq, Eq)]
pub enum TranslateError {
    /// An upstream event (complete, or still waiting for its blank line) is over the cap.
    TooLarge,
    /// An upstream event is not what the provider's format allows.
    Malformed(String),
}

pub struct StreamTranslator {
    splitter: SseSplitter,
    decoder: Box<dyn StreamDecoder>,
    encoder: StreamEncoder,
    /// Reused between events.
    events: Vec<Event>,
    max_event: usize,
    /// The provider's final usage, once its stream reported it.
    pub usage: Option<Usage>,
}

impl StreamTranslator {
    pub fn new(adapter: &dyn ProviderAdapter, model: &str, created: u64, max_event: usize) -> StreamTranslator {
        StreamTranslator {
            splitter: SseSplitter::new(),
            decoder: adapter.stream_decoder(),
            encoder: StreamEncoder::new(model, created),
            events: Vec::new(),
            max_event,
            usage: None,
        }
    }

    /// Translate one upstream chunk: the client's bytes for every event it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<u8>, TranslateError> {
        self.splitter.push(chunk);
        let mut out = Vec::new();
        while let Some(raw) = self.splitter.next_event() {
            if raw.len() > self.max_event {
                return Err(TranslateError::TooLarge);
            }
            self.translate(&raw, &mut out)?;
        }
        if self.splitter.buffered() > self.max_event {
            self.splitter.clear();
            return Err(TranslateError::TooLarge);
        }
        Ok(out)
    }

    /// The upstream ended: an event left without its blank line is translated too.
    pub fn finish(&mut self) -> Result<Vec<u8>, TranslateError> {
        let rest = self.splitter.take_rest();
        let mut out = Vec::new();
        if !rest.iter().all(u8::is_ascii_whitespace) {
            self.translate(&rest, &mut out)?;
        }
        self.events.clear();
        self.decoder.finish(&mut self.events);
        self.encode_events(&mut out);
        Ok(out)
    }

    fn translate(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Result<(), TranslateError> {
        self.events.clear();
        self.decoder
            .decode(&SseEvent::parse(raw), &mut self.events)
            .map_err(TranslateError::Malformed)?;
        self.encode_events(out);
        Ok(())
    }

    fn encode_events(&mut self, out: &mut Vec<u8>) {
        for event in &self.events {
            if let Event::Usage(usage) = event {
                self.usage = Some(*usage);
            }
            self.encoder.encode(event, out);
        }
    }
}
