//! Step 7 of the flow for streamed answers: relay upstream SSE bytes to the client event by
//! event, metering each and letting plugins see it.

use crate::chain::PluginChain;
use crate::metering::stream::{Inspected, StreamMeter};
use crate::providers::translate::{StreamTranslator, TranslateError};
use crate::sse::{SseEvent, SseSplitter};
use crate::upstream::scrub::Scrubber;
use bytes::Bytes;
use komilion_sdk::{Exchange, StreamEvent, Usage};
use std::sync::Arc;

/// Turns upstream body chunks into what the client is sent.
pub struct StreamRelay {
    splitter: SseSplitter,
    pub meter: StreamMeter,
    /// Largest event accepted, in bytes (an event still waiting for its blank line counts).
    max_event: usize,
    /// Why the stream cannot go on, once it cannot: nothing more is relayed.
    broken: Option<String>,
    /// Masks secrets in error events before they are relayed.
    scrubber: Arc<Scrubber>,
    /// For a provider of another format: turns its stream into OpenAI's first.
    translator: Option<StreamTranslator>,
    /// For a client of another surface: turns the checked OpenAI stream into its own last.
    surface: Option<SurfaceStage>,
}

/// The last step for Anthropic's Messages clients: OpenAI chunk events, already checked and
/// metered, written as Messages events.
struct SurfaceStage {
    splitter: SseSplitter,
    decoder: Box<dyn crate::providers::StreamDecoder>,
    encoder: crate::formats::anthropic_messages::StreamEncoder,
    events: Vec<crate::formats::canonical::Event>,
}

impl SurfaceStage {
    fn convert(&mut self, openai: &[u8]) -> Bytes {
        self.splitter.push(openai);
        let mut out = Vec::new();
        while let Some(raw) = self.splitter.next_event() {
            self.events.clear();
            // The relay let only valid events through; one the decoder still refuses is
            // dropped rather than end a stream the client has been reading.
            if self.decoder.decode(&SseEvent::parse(&raw), &mut self.events).is_ok() {
                for event in &self.events {
                    self.encoder.encode(event, &mut out);
                }
            }
        }
        Bytes::from(out)
    }
}

/// What one upstream chunk gave.
pub struct Fed {
    /// The bytes to send the client now.
    pub out: Option<Bytes>,
    /// The upstream sent something that is not a valid event: after `out`, end the client's
    /// stream with an error event.
    pub broken: Option<String>,
}

/// An event over the size cap (complete, or still waiting for its blank line): counted, and
/// why the stream ends.
fn too_large(max_event: usize) -> String {
    crate::metrics::METRICS.stream_events_too_large.inc();
    format!("the provider sent an event over the limit of {max_event} bytes")
}

impl StreamRelay {
    /// `strip_usage`: the usage chunk was requested for the gateway, not the client. `model`
    /// names the tokenizer that counts delivered output if no usage arrives.
    pub fn new(
        strip_usage: bool,
        model: &str,
        limits: crate::config::StreamLimits,
        scrubber: Arc<Scrubber>,
    ) -> StreamRelay {
        StreamRelay {
            splitter: SseSplitter::new(),
            meter: StreamMeter::with_window(strip_usage, model, limits.count_window_bytes),
            max_event: limits.max_event_bytes,
            broken: None,
            scrubber,
            translator: None,
            surface: None,
        }
    }

    /// Write the stream in `surface`'s format (OpenAI's needs no step).
    pub fn for_surface(mut self, surface: komilion_sdk::Surface, model: &str) -> StreamRelay {
        use crate::providers::ProviderAdapter;
        if surface == komilion_sdk::Surface::Anthropic {
            self.surface = Some(SurfaceStage {
                splitter: SseSplitter::new(),
                decoder: crate::providers::openai::OpenAi.stream_decoder(),
                encoder: crate::formats::anthropic_messages::StreamEncoder::new(model),
                events: Vec::new(),
            });
        }
        self
    }

    /// Bytes in the client's surface's format.
    fn in_client_format(&mut self, fed: Fed) -> Fed {
        match (&mut self.surface, fed.out) {
            (Some(stage), Some(out)) => {
                let converted = stage.convert(&out);
                Fed {
                    out: (!converted.is_empty()).then_some(converted),
                    broken: fed.broken,
                }
            }
            (_, out) => Fed {
                out,
                broken: fed.broken,
            },
        }
    }

    /// Translate the provider's stream before relaying it.
    pub fn translating(mut self, translator: StreamTranslator) -> StreamRelay {
        self.translator = Some(translator);
        self
    }

    /// The provider's own usage figures, if its stream reported them.
    pub fn provider_usage(&self) -> Option<Usage> {
        // A translated stream's usage keeps what OpenAI's shape cannot carry (cache writes).
        self.translator.as_ref().and_then(|t| t.usage).or(self.meter.usage)
    }

    /// Run a chunk through the translator, if there is one.
    fn translated(&mut self, chunk: &[u8], last: bool) -> Result<Option<Vec<u8>>, String> {
        let Some(translator) = &mut self.translator else {
            return Ok(None);
        };
        let out = if last {
            translator.finish()
        } else {
            translator.feed(chunk)
        };
        match out {
            Ok(out) => Ok(Some(out)),
            Err(TranslateError::TooLarge) => Err(too_large(self.max_event)),
            Err(TranslateError::Malformed(why)) => Err(why),
        }
    }

    /// Feed one upstream chunk. Only complete events go out, so a client never sees half an
    /// event the gateway has not checked.
    pub fn feed(&mut self, chunk: &[u8], chain: &PluginChain, ex: &mut Exchange) -> Fed {
        let fed = self.feed_openai(chunk, chain, ex);
        self.in_client_format(fed)
    }

    /// The unterminated tail when the upstream ended cleanly: an event without its blank line
    /// is metered (and checked) like any other, then sent with its blank line.
    pub fn finish(&mut self, chain: &PluginChain, ex: &mut Exchange) -> Fed {
        let fed = self.finish_openai(chain, ex);
        self.in_client_format(fed)
    }

    /// Feed one upstream chunk, giving OpenAI's format.
    fn feed_openai(&mut self, chunk: &[u8], chain: &PluginChain, ex: &mut Exchange) -> Fed {
        if self.broken.is_some() {
            return Fed {
                out: None,
                broken: self.broken.clone(),
            };
        }
        match self.translated(chunk, false) {
            Ok(None) => self.feed_surface(chunk, chain, ex),
            Ok(Some(translated)) => self.feed_surface(&translated, chain, ex),
            Err(why) => {
                self.broken = Some(why);
                Fed {
                    out: None,
                    broken: self.broken.clone(),
                }
            }
        }
    }

    /// Feed bytes already in the client's format.
    fn feed_surface(&mut self, chunk: &[u8], chain: &PluginChain, ex: &mut Exchange) -> Fed {
        let StreamRelay {
            splitter,
            meter,
            broken,
            max_event,
            scrubber,
            translator: _,
            surface: _,
        } = self;
        splitter.push(chunk);
        let plugins_listen = chain.wants_events();
        let out = splitter.drain(|raw| {
            if broken.is_some() {
                return None;
            }
            if raw.len() > *max_event {
                *broken = Some(too_large(*max_event));
                return None;
            }
            match meter.inspect(raw.clone()) {
                Inspected::Send(out) => {
                    if plugins_listen {
                        let event = SseEvent::parse(&raw);
                        chain.on_event(
                            &StreamEvent {
                                event: event.event,
                                data: &event.data,
                            },
                            ex,
                        );
                    }
                    Some(out)
                }
                Inspected::Error(event) => {
                    let event = scrubber.scrub_body(event);
                    tracing::warn!(request_id = %ex.request_id, "the provider reported an error in the stream: {}", String::from_utf8_lossy(&event).trim());
                    Some(event)
                }
                Inspected::Drop => None,
                Inspected::Malformed(why) => {
                    *broken = Some(why);
                    None
                }
            }
        });
        if broken.is_none() && splitter.buffered() > *max_event {
            *broken = Some(too_large(*max_event));
            splitter.clear();
        }
        Fed {
            out,
            broken: broken.clone(),
        }
    }

    fn finish_openai(&mut self, chain: &PluginChain, ex: &mut Exchange) -> Fed {
        if self.broken.is_none() {
            match self.translated(&[], true) {
                Ok(None) => {}
                Ok(Some(translated)) => {
                    let fed = self.feed_surface(&translated, chain, ex);
                    if fed.broken.is_some() {
                        return fed;
                    }
                    let rest = self.finish_surface(chain, ex);
                    return Fed {
                        out: join(fed.out, rest.out),
                        broken: rest.broken,
                    };
                }
                Err(why) => self.broken = Some(why),
            }
        }
        self.finish_surface(chain, ex)
    }

    fn finish_surface(&mut self, chain: &PluginChain, ex: &mut Exchange) -> Fed {
        let rest = self.splitter.take_rest();
        if rest.iter().all(u8::is_ascii_whitespace) || self.broken.is_some() {
            return Fed {
                out: None,
                broken: self.broken.clone(),
            };
        }
        let mut terminated = rest.to_vec();
        terminated.extend_from_slice(b"\n\n");
        self.feed_surface(&terminated, chain, ex)
    }
}

fn join(a: Option<Bytes>, b: Option<Bytes>) -> Option<Bytes> {
    match (a, b) {
        (Some(a), Some(b)) => Some(Bytes::from([&a[..], &b[..]].concat())),
        (a, None) => a,
        (None, b) => b,
    }
}
