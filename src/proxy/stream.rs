//! Step 7 of the flow for streamed answers: relay upstream SSE bytes to the client, event by
//! event, letting plugins see each event.

use crate::chain::PluginChain;
use crate::sse::{SseEvent, SseSplitter};
use bytes::Bytes;
use komilion_sdk::{Exchange, StreamEvent};

/// Turns upstream body chunks into what the client is sent.
pub struct StreamRelay {
    splitter: SseSplitter,
    /// Parse events (someone looks at them); otherwise chunks pass through untouched.
    parse: bool,
}

impl StreamRelay {
    pub fn new(parse: bool) -> StreamRelay {
        StreamRelay {
            splitter: SseSplitter::new(),
            parse,
        }
    }

    /// Feed one upstream chunk; returns the bytes to send now (complete events only when
    /// parsing, so a client never sees half an event the gateway has not checked).
    pub fn feed(&mut self, chunk: Bytes, chain: &PluginChain, ex: &mut Exchange) -> Option<Bytes> {
        if !self.parse {
            return (!chunk.is_empty()).then_some(chunk);
        }
        self.splitter.push(&chunk);
        self.splitter.drain(|raw| {
            let event = SseEvent::parse(raw);
            chain.on_event(
                &StreamEvent {
                    event: event.event,
                    data: &event.data,
                },
                ex,
            );
            true
        })
    }

    /// The unterminated tail when the upstream ended cleanly (forwarded as it was).
    pub fn finish(&mut self) -> Bytes {
        self.splitter.take_rest()
    }
}
