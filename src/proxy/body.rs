//! Step 3 of the flow: read the request body, bounded, answering `Expect: 100-continue`.
//!
//! The whole body is needed before routing (the model is in it), and Pingora 0.9.1 replays at
//! most 64 KiB of a body read this early, so LLM routes read it here and forward it themselves.

use bytes::{Bytes, BytesMut};
use komilion_sdk::{ApiError, ErrorKind, Timing};
use pingora::proxy::Session;
use std::time::{Duration, Instant};

/// Longest wait for the next piece of a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

pub enum BodyError {
    /// Over the limit: answer 413 and close the connection (the rest is never read).
    TooLarge(ApiError),
    /// The client went away or stalled; nobody to answer.
    ClientGone,
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

pub async fn read_body(
    session: &mut Session,
    limit: usize,
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
    if expects_continue
        && session
            .as_downstream_mut()
            .write_continue_response()
            .await
            .is_err()
    {
        return Err(BodyError::ClientGone);
    }
    session.set_read_timeout(Some(BODY_READ_TIMEOUT));

    // Most bodies arrive in one piece: keep it as is. Copy only when there are several.
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    loop {
        let started = Instant::now();
        let piece = session.read_request_body().await;
        timing.client_wait += started.elapsed();
        let piece = match piece {
            Ok(Some(piece)) => piece,
            Ok(None) => break,
            Err(_) => return Err(BodyError::ClientGone),
        };
        let so_far = rest.as_ref().map_or(0, |b| b.len()) + first.as_ref().map_or(0, |b| b.len());
        if so_far + piece.len() > limit {
            session.set_keepalive(None);
            return Err(too_large(limit));
        }
        match (&mut first, &mut rest) {
            (None, None) => first = Some(piece),
            (Some(_), None) => {
                let mut buf = BytesMut::with_capacity(
                    declared.unwrap_or(so_far + piece.len() * 2).min(limit),
                );
                if let Some(f) = first.take() {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&piece);
                rest = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&piece),
        }
    }
    Ok(match (first, rest) {
        (_, Some(buf)) => buf.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}
