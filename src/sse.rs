//! Server-sent events, incrementally.
//!
//! Upstream body chunks never line up with events (a read returns whatever the socket had), so
//! the splitter keeps the tail of an unfinished event until its blank line arrives. Complete
//! events come out as zero-copy slices of the buffer, with their terminating blank line, ready
//! to be forwarded as they were received.

use bytes::{Bytes, BytesMut};
use std::borrow::Cow;

/// Splits a byte stream into complete SSE events.
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: BytesMut,
    /// Bytes of `buf` already scanned for a boundary, so each byte is scanned once.
    scanned: usize,
}

impl SseSplitter {
    pub fn new() -> Self {
        SseSplitter::default()
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event (including its blank line), if one is buffered.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = self.find_boundary_from(0)?;
        self.scanned = self.scanned.saturating_sub(end);
        Some(self.buf.split_to(end).freeze())
    }

    /// All complete events buffered, as one contiguous slice (for pass-through), and how many.
    pub fn complete_prefix(&mut self) -> Option<Bytes> {
        let mut end = 0;
        while let Some(e) = self.find_boundary_from(end) {
            end = e;
        }
        self.scanned = self.scanned.saturating_sub(end);
        (end > 0).then(|| self.buf.split_to(end).freeze())
    }

    /// Take every complete event through `map`, which returns what to send for it: the event
    /// itself (kept), other bytes (rewritten) or nothing (dropped). When every event is kept (the
    /// usual case) the result is one zero-copy slice of the buffer.
    pub fn drain(&mut self, mut map: impl FnMut(Bytes) -> Option<Bytes>) -> Option<Bytes> {
        let mut end = 0;
        let mut ends = Vec::new();
        while let Some(next) = self.find_boundary_from(end) {
            ends.push(next);
            end = next;
        }
        self.scanned = self.scanned.saturating_sub(end);
        if end == 0 {
            return None;
        }
        let prefix = self.buf.split_to(end).freeze();
        let mut out: Option<BytesMut> = None;
        let mut start = 0;
        for &stop in &ends {
            let event = prefix.slice(start..stop);
            let mapped = map(event.clone());
            let unchanged = mapped
                .as_ref()
                .is_some_and(|m| m.as_ptr() == event.as_ptr() && m.len() == event.len());
            match (&mut out, unchanged) {
                (None, true) => {}
                (None, false) => {
                    // First change: copy what was kept so far, then go on piece by piece.
                    let mut buf = BytesMut::with_capacity(prefix.len());
                    buf.extend_from_slice(&prefix[..start]);
                    if let Some(m) = mapped {
                        buf.extend_from_slice(&m);
                    }
                    out = Some(buf);
                }
                (Some(buf), _) => {
                    if let Some(m) = mapped {
                        buf.extend_from_slice(&m);
                    }
                }
            }
            start = stop;
        }
        match out {
            None => Some(prefix),
            Some(buf) if buf.is_empty() => None,
            Some(buf) => Some(buf.freeze()),
        }
    }

    /// What is left when the stream ends: an event without its blank line, or nothing.
    pub fn take_rest(&mut self) -> Bytes {
        self.scanned = 0;
        self.buf.split().freeze()
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forget everything buffered.
    pub fn clear(&mut self) {
        self.buf = BytesMut::new();
        self.scanned = 0;
    }

    /// The end of the first event starting at `from`: just past a line break that follows a
    /// line break (`\n\n`, `\r\n\r\n`, `\r\r` and mixtures).
    fn find_boundary_from(&mut self, from: usize) -> Option<usize> {
        let bytes = &self.buf[..];
        let mut i = self.scanned.max(from);
        while i < bytes.len() {
            let Some(off) = memchr::memchr2(b'\n', b'\r', &bytes[i..]) else {
                self.scanned = bytes.len();
                return None;
            };
            let pos = i + off;
            // Length of the line break at `pos`.
            let first = match (bytes[pos], bytes.get(pos + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    // A lone `\r` at the end may be the start of `\r\n`; wait for more.
                    self.scanned = pos;
                    return None;
                }
                _ => 1,
            };
            let next = pos + first;
            match bytes.get(next) {
                Some(b'\n') => return Some(next + 1),
                Some(b'\r') => match bytes.get(next + 1) {
                    Some(b'\n') => return Some(next + 2),
                    Some(_) => return Some(next + 1),
                    None => {
                        self.scanned = pos;
                        return None;
                    }
                },
                Some(_) => i = next,
                None => {
                    self.scanned = pos;
                    return None;
                }
            }
        }
        self.scanned = bytes.len();
        None
    }
}

/// The fields of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub event: Option<&'a str>,
    /// The `data:` lines joined with `\n` (borrowed when there is one line).
    pub data: Cow<'a, str>,
}

impl<'a> SseEvent<'a> {
    /// Parse a complete event. Comments (`:` lines) and unknown fields are skipped; invalid
    /// UTF-8 lines are skipped too (they carry nothing a JSON consumer could use).
    pub fn parse(raw: &'a [u8]) -> SseEvent<'a> {
        let mut event = None;
        let mut data: Option<Cow<'a, str>> = None;
        for line in raw.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Ok(line) = std::str::from_utf8(line) else {
                continue;
            };
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => event = Some(value),
                "data" => {
                    data = Some(match data {
                        None => Cow::Borrowed(value),
                        Some(prev) => Cow::Owned(format!("{prev}\n{value}")),
                    })
                }
                _ => {}
            }
        }
        SseEvent {
            event,
            data: data.unwrap_or(Cow::Borrowed("")),
        }
    }

    /// True for OpenAI's end marker, `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data.trim() == "[DONE]"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> Vec<Bytes> {
        let mut s = SseSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            while let Some(e) = s.next_event() {
                out.push(e);
            }
        }
        out
    }

    #[test]
    fn events_survive_any_chunking() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\nevent: ping\ndata: x\n\ndata: [DONE]\n\n";
        let whole = split_all(&[stream]);
        assert_eq!(whole.len(), 4);
        for cut in 1..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(split_all(&[a, b]), whole, "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(split_all(&bytewise), whole);
        assert_eq!(whole.concat(), stream.to_vec(), "bytes pass through unchanged");
    }

    #[test]
    fn complete_prefix_keeps_the_partial_tail() {
        let mut s = SseSplitter::new();
        s.push(b"data: 1\n\ndata: 2\n\ndata: 3");
        assert_eq!(&s.complete_prefix().unwrap()[..], b"data: 1\n\ndata: 2\n\n");
        assert_eq!(s.complete_prefix(), None);
        s.push(b"\n\n");
        assert_eq!(&s.complete_prefix().unwrap()[..], b"data: 3\n\n");
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn drain_drops_only_the_refused_events() {
        let mut s = SseSplitter::new();
        s.push(b"data: 1\n\ndata: drop\n\ndata: 3\n\ndata: 4");
        let drop_some = |e: Bytes| (!e.starts_with(b"data: drop")).then_some(e);
        let kept = s.drain(drop_some).unwrap();
        assert_eq!(&kept[..], b"data: 1\n\ndata: 3\n\n");
        s.push(b"\n\n");
        assert_eq!(&s.drain(Some).unwrap()[..], b"data: 4\n\n");
        s.push(b"data: drop\n\n");
        assert_eq!(s.drain(drop_some), None);
        s.push(b"data: a\n\ndata: b\n\n");
        let rewritten = s.drain(|e| {
            Some(if e.starts_with(b"data: b") {
                Bytes::from_static(b"data: B\n\n")
            } else {
                e
            })
        });
        assert_eq!(&rewritten.unwrap()[..], b"data: a\n\ndata: B\n\n");
        s.push(b"data: a\n\ndata: b\n\n");
        let whole = s.drain(Some).unwrap();
        assert_eq!(&whole[..], b"data: a\n\ndata: b\n\n");
    }

    #[test]
    fn parses_fields() {
        let e = SseEvent::parse(b"event: message_start\r\ndata: {\"x\":\r\ndata: 1}\r\n: comment\r\n\r\n");
        assert_eq!(e.event, Some("message_start"));
        assert_eq!(e.data, "{\"x\":\n1}");
        assert!(SseEvent::parse(b"data: [DONE]\n\n").is_done());
        assert_eq!(SseEvent::parse(b"data:x\n\n").data, "x");
    }
}
