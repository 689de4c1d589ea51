//! Writing responses to the client. Every response header passes through the plugins'
//! `on_response` here, whatever produced it.
//!
//! Errors are written with `write_response_header/_body` rather than Pingora's
//! `respond_error*`, which would close keep-alive connections.

use super::{Gateway, RequestCtx};
use bytes::Bytes;
use komilion_sdk::{LocalResponse, ResponseHead};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Frame a response body of unknown length (a stream, an export) for this client: chunked
/// for HTTP/1.1. An HTTP/1.0 client does not know chunked encoding (RFC 9112 §7.1: a server
/// MUST NOT send it one), so its body ends when the connection closes; keep-alive is turned off
/// before the header goes out, so that the header says `connection: close` (Pingora closes a
/// close-delimited body's connection anyway, `v1/server.rs:906-910`, but only after writing the
/// header). HTTP/2 frames bodies itself.
pub(crate) fn frame_unknown_length(session: &mut Session, resp: &mut ResponseHeader) {
    if session.is_http2() {
        return;
    }
    if session.req_header().version == http::Version::HTTP_11 {
        let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
    } else {
        session.set_keepalive(None);
    }
}

impl Gateway {
    /// Build a response header with the plugins' additions.
    pub(super) fn response_header(
        &self,
        ctx: &RequestCtx,
        status: u16,
        content_type: &str,
    ) -> Option<Box<ResponseHeader>> {
        let mut head = ResponseHead::new(status);
        self.chain.on_response(&mut head, &ctx.exchange);
        let size = 4 + head.headers.len() + ctx.provider_headers.len();
        let mut resp = ResponseHeader::build(status, Some(size)).ok()?;
        resp.insert_header(http::header::CONTENT_TYPE, content_type).ok()?;
        // The provider's first; a plugin's header of the same name replaces it (the gateway's
        // own rate limits are what this client is held to).
        for (name, value) in &ctx.provider_headers {
            resp.insert_header(name.clone(), value.clone()).ok()?;
        }
        for (name, value) in head.headers.iter() {
            resp.insert_header(name.clone(), value.clone()).ok()?;
        }
        Some(Box::new(resp))
    }

    /// Write a whole response with a known body.
    pub(super) async fn send_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
    ) {
        self.send_body_with(session, ctx, status, content_type, body, &[]).await
    }

    pub(super) async fn send_body_with(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
        extra: &[(&'static str, String)],
    ) {
        // Every whole answer (upstream, refusal or error) settles the request and spools its
        // usage record before any byte of it goes out.
        self.finish_usage(ctx, status);
        let Some(mut resp) = self.response_header(ctx, status, content_type) else {
            session.set_keepalive(None);
            return;
        };
        let _ = resp.insert_header(http::header::CONTENT_LENGTH, body.len());
        for (name, value) in extra {
            let _ = resp.insert_header(*name, value.as_str());
        }
        ctx.status = status;
        let head_only = session.req_header().method == http::Method::HEAD;
        if session.write_response_header(resp, head_only).await.is_err() {
            ctx.client_gone = true;
            return;
        }
        if !head_only && session.write_response_body(Some(body), true).await.is_err() {
            ctx.client_gone = true;
        }
    }

    /// Answer with a plugin's or the engine's local response, in the client's API format.
    pub(super) async fn send_local(&self, session: &mut Session, ctx: &mut RequestCtx, response: LocalResponse) {
        match response {
            LocalResponse::Error(e) => {
                let body = Bytes::from(e.render(ctx.exchange.surface));
                let extra = e.retry_headers();
                self.send_body_with(session, ctx, e.status(), "application/json", body, &extra)
                    .await;
            }
            LocalResponse::Body {
                status,
                content_type,
                body,
            } => {
                self.send_body(session, ctx, status, content_type, body).await;
            }
        }
    }
}
