//! Step 7 of the flow for streamed answers: relay upstream SSE bytes to the client event by
//! event, metering each and letting plugins see it.

use crate::chain::PluginChain;
use crate::metering::stream::StreamMeter;
use crate::sse::{SseEvent, SseSplitter};
use bytes::Bytes;
use komilion_sdk::{Exchange, StreamEvent};

/// Turns upstream body chunks into what the client is sent.
pub struct StreamRelay {
    splitter: SseSplitter,
    pub meter: StreamMeter,
}

impl StreamRelay {
    /// `strip_usage`: the usage chunk was requested for the gateway, not the client.
    pub fn new(strip_usage: bool) -> StreamRelay {
        StreamRelay {
            splitter: SseSplitter::new(),
            meter: StreamMeter::new(strip_usage),
        }
    }

    /// Feed one upstream chunk; returns the bytes to send now. Only complete events go out, so
    /// a client never sees half an event the gateway has not checked.
    pub fn feed(&mut self, chunk: &[u8], chain: &PluginChain, ex: &mut Exchange) -> Option<Bytes> {
        let StreamRelay { splitter, meter } = self;
        splitter.push(chunk);
        let plugins_listen = chain.wants_events();
        splitter.drain(|raw| {
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
            meter.inspect(raw)
        })
    }

    /// The unterminated tail when the upstream ended cleanly (forwarded as it was).
    pub fn finish(&mut self) -> Bytes {
        self.splitter.take_rest()
    }
}
