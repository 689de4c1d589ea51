//! `POST /webhooks/stripe`: Stripe's signature is the credential here, so this route skips the
//! plugin chain (no API key) and answers in Stripe's terms: 2xx when handled (or deliberately
//! ignored), 400 for a bad signature or event, 503 when the store is down (Stripe retries).

use super::{Gateway, RequestCtx};
use crate::billing::stripe::{handle_event, verify_signature, Outcome, WebhookError};
use crate::store::cache::StoreSlot;
use bytes::Bytes;
use komilion_sdk::{ApiError, ErrorKind, LocalResponse};
use pingora::proxy::Session;

/// Largest webhook body accepted (Stripe events are a few KiB).
const MAX_WEBHOOK_BODY: usize = 256 * 1024;

pub struct StripeEndpoint {
    pub secret: String,
    pub tolerance_secs: u64,
    pub store: StoreSlot,
}

impl Gateway {
    pub(super) async fn stripe_webhook(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), LocalResponse> {
        let Some(endpoint) = &self.stripe else {
            return Err(ApiError::new(ErrorKind::NotFound, "Stripe top-ups are not configured.")
                .with_code("unknown_route")
                .into());
        };
        let header = session
            .req_header()
            .headers
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let Some(payload) = self.read_client_body(session, ctx, MAX_WEBHOOK_BODY).await? else {
            return Ok(());
        };
        let now = chrono::Utc::now().timestamp();
        if let Err(e) = verify_signature(&header, &payload, &endpoint.secret, endpoint.tolerance_secs, now) {
            tracing::warn!("refused a Stripe webhook: {e}");
            return Err(
                ApiError::new(ErrorKind::InvalidRequest, format!("Invalid Stripe signature: {e}."))
                    .with_code("invalid_signature")
                    .into(),
            );
        }
        let store = crate::store::cache::opened(&endpoint.store)
            .await
            .ok_or_else(|| ApiError::new(ErrorKind::Unavailable, "The store is still opening.").with_retry_after(1))?;
        match handle_event(store.as_ref(), &payload).await {
            Ok(outcome) => {
                match &outcome {
                    Outcome::Credited {
                        account_id,
                        amount_nano_usd,
                    } => {
                        tracing::info!(account_id, amount_nano_usd, "Stripe top-up credited")
                    }
                    Outcome::Replay => tracing::info!("Stripe event replayed; nothing done"),
                    // Logged with its details where it was kept.
                    Outcome::Unmatched(_) => {}
                    Outcome::Ignored(why) => tracing::info!("Stripe event ignored: {why}"),
                }
                let body =
                    serde_json::json!({"received": true, "credited": matches!(outcome, Outcome::Credited { .. })});
                self.send_body(session, ctx, 200, "application/json", Bytes::from(body.to_string()))
                    .await;
                Ok(())
            }
            Err(WebhookError::Store(e)) => Err(ApiError::new(ErrorKind::Unavailable, e.to_string())
                .with_retry_after(5)
                .into()),
            Err(e) => Err(ApiError::new(ErrorKind::InvalidRequest, e.to_string()).into()),
        }
    }
}
