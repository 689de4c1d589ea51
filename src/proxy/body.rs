//! Step 3 of the flow: read the request body, bounded, answering `Expect: 100-continue`.
//!
//! The whole body is needed before routing (the model is in it), and Pingora 0.9.1 replays at
//! most 64 KiB of a body read this early, so LLM routes read it here and forward it themselves.

use crate::metrics::METRICS;
use bytes::{Bytes, BytesMut};
use komilion_sdk::{ApiError, ErrorKind, Timing};
use pingora::proxy::Session;
use std::time::{Duration, Instant};

pub enum BodyError {
    /// Over the limit: answer 413 and close the connection (the rest is never read).
    TooLarge(ApiError),
    /// The whole body did not arrive in time: answer 408 and close the connection.
    TimedOut(ApiError),
    /// The client went away; nobody to answer.
    ClientGone,
}

impl BodyError {
    /// What to answer, when anyone is left to answer.
    pub fn into_answer(self) -> Option<ApiError> {
        match self {
            BodyError::TooLarge(e) | BodyError::TimedOut(e) => Some(e),
            BodyError::ClientGone => None,
        }
    }
}

fn too_large(limit: usize) -> BodyError {
    BodyError::TooLarge(
        ApiError::new(
            ErrorKind::RequestTooLarge,
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large"),
    )
}

/// Read the whole body: at most `limit` bytes, all of it within `timeout` (a deadline for the
/// whole body, not per read, so a client trickling bytes cannot hold the request open).
pub async fn read_body(
    session: &mut Session,
    limit: usize,
    timeout: Duration,
    timing: &mut Timing,
) -> Result<Bytes, BodyError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        session.set_keepalive(None);
        return Err(too_large(limit));
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && session.as_downstream_mut().write_continue_response().await.is_err() {
        return Err(BodyError::ClientGone);
    }
    // Pingora's own timeout is per read; the deadline below bounds the whole body, and no
    // single read may outlast it either.
    session.set_read_timeout(Some(timeout));
    let deadline = tokio::time::Instant::now() + timeout;

    let mut body = BodyBuffer::new(limit, declared.unwrap_or(0));
    loop {
        let started = Instant::now();
        let piece = tokio::time::timeout_at(deadline, session.read_request_body()).await;
        timing.client_wait += started.elapsed();
        match piece {
            Ok(Ok(Some(piece))) => {
                if body.push(piece).is_err() {
                    session.set_keepalive(None);
                    return Err(too_large(limit));
                }
            }
            Ok(Ok(None)) => return Ok(body.finish()),
            Ok(Err(e)) if e.etype() != &pingora::ErrorType::ReadTimedout => return Err(BodyError::ClientGone),
            Ok(Err(_)) | Err(_) => {
                // The rest of the body is never read: the connection cannot serve another
                // request.
                session.set_keepalive(None);
                METRICS.client_timeouts.with_label_values(&["body"]).inc();
                return Err(BodyError::TimedOut(
                    ApiError::new(
                        ErrorKind::RequestTimeout,
                        format!("The request body was not received within {} ms.", timeout.as_millis()),
                    )
                    .with_code("request_timeout"),
                ));
            }
        }
    }
}

/// Collects a body from pieces, up to a limit. Most bodies arrive in one piece, which is kept
/// as it is; only a body in several pieces is copied into one buffer.
pub struct BodyBuffer {
    first: Option<Bytes>,
    rest: Option<BytesMut>,
    len: usize,
    limit: usize,
    size_hint: usize,
}

/// The body went over its limit.
#[derive(Debug)]
pub struct OverLimit;

impl BodyBuffer {
    pub fn new(limit: usize, size_hint: usize) -> BodyBuffer {
        BodyBuffer {
            first: None,
            rest: None,
            len: 0,
            limit,
            size_hint: size_hint.min(limit),
        }
    }

    pub fn push(&mut self, piece: Bytes) -> Result<(), OverLimit> {
        if self.len + piece.len() > self.limit {
            return Err(OverLimit);
        }
        self.len += piece.len();
        match (&mut self.first, &mut self.rest) {
            (None, None) => self.first = Some(piece),
            (_, Some(buf)) => buf.extend_from_slice(&piece),
            (Some(_), None) => {
                let mut buf = BytesMut::with_capacity(self.size_hint.max(self.len));
                if let Some(first) = self.first.take() {
                    buf.extend_from_slice(&first);
                }
                buf.extend_from_slice(&piece);
                self.rest = Some(buf);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Bytes {
        match (self.first, self.rest) {
            (_, Some(buf)) => buf.freeze(),
            (Some(first), None) => first,
            (None, None) => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_piece_is_kept_several_are_joined_and_the_limit_holds() {
        let mut one = BodyBuffer::new(10, 0);
        let piece = Bytes::from_static(b"hello");
        one.push(piece.clone()).unwrap();
        assert_eq!(one.finish().as_ptr(), piece.as_ptr(), "no copy");

        let mut many = BodyBuffer::new(10, 0);
        for p in [&b"ab"[..], b"cd", b"ef"] {
            many.push(Bytes::copy_from_slice(p)).unwrap();
        }
        assert_eq!(&many.finish()[..], b"abcdef");

        let mut over = BodyBuffer::new(4, 0);
        over.push(Bytes::from_static(b"abc")).unwrap();
        assert!(over.push(Bytes::from_static(b"de")).is_err());
    }
}
