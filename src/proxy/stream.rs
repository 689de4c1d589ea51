//! Step 7 of the flow for streamed answers: relay upstream SSE bytes to the client event by
//! event, metering each and letting plugins see it.

use crate::chain::PluginChain;
use crate::metering::stream::{Inspected, StreamMeter};
use crate::sse::{SseEvent, SseSplitter};
use crate::upstream::scrub::Scrubber;
use bytes::Bytes;
use komilion_sdk::{Exchange, StreamEvent};
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
        }
    }

    /// Feed one upstream chunk. Only complete events go out, so a client never sees half an
    /// event the gateway has not checked.
    pub fn feed(&mut self, chunk: &[u8], chain: &PluginChain, ex: &mut Exchange) -> Fed {
        if self.broken.is_some() {
            return Fed {
                out: None,
                broken: self.broken.clone(),
            };
        }
        let StreamRelay {
            splitter,
            meter,
            broken,
            max_event,
            scrubber,
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

    /// The unterminated tail when the upstream ended cleanly: an event without its blank line
    /// is metered (and checked) like any other, then sent with its blank line.
    pub fn finish(&mut self, chain: &PluginChain, ex: &mut Exchange) -> Fed {
        let rest = self.splitter.take_rest();
        if rest.iter().all(u8::is_ascii_whitespace) || self.broken.is_some() {
            return Fed {
                out: None,
                broken: self.broken.clone(),
            };
        }
        let mut terminated = rest.to_vec();
        terminated.extend_from_slice(b"\n\n");
        self.feed(&terminated, chain, ex)
    }
}
