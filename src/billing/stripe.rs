//! Stripe top-ups: `POST /webhooks/stripe` on the gateway listener.
//!
//! The `Stripe-Signature` header (`t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`, one
//! or more `v1`) is checked against the endpoint's signing secret in constant time, with a
//! timestamp tolerance against replays. A Checkout Session that is paid, in USD, credits the
//! account named in `metadata.account_id` by `amount_total` cents, once per session: card
//! payments arrive paid in `checkout.session.completed`, delayed methods (bank debits) arrive
//! unpaid there and paid in `checkout.session.async_payment_succeeded`, and Stripe retries
//! deliveries; crediting per session id makes every replay and every second event a no-op. A
//! session without `payment_status: "paid"` credits nothing.
//!
//! A paid session that cannot be credited (no or unknown account, another currency) is money
//! received for nobody: it is kept in the store's unmatched payments, counted in
//! `komilion_stripe_unmatched_total` and logged as an error, for an operator to settle.

use crate::metrics::METRICS;
use crate::store::{Store, StoreError, UnmatchedPayment};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Nano-USD per cent.
const NANOS_PER_CENT: i64 = 10_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("missing or malformed Stripe-Signature header")]
    MalformedHeader,
    #[error("the signature timestamp is outside the tolerance")]
    StaleTimestamp,
    #[error("no signature matches")]
    BadSignature,
    #[error("the event is not valid JSON: {0}")]
    BadEvent(String),
    #[error("{0}")]
    Store(StoreError),
}

/// Check a `Stripe-Signature` header for `payload` at time `now` (Unix seconds).
pub fn verify_signature(
    header: &str,
    payload: &[u8],
    secret: &str,
    tolerance_secs: u64,
    now: i64,
) -> Result<(), WebhookError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", sig)) => signatures.push(hex::decode(sig).map_err(|_| WebhookError::MalformedHeader)?),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(WebhookError::MalformedHeader)?;
    if signatures.is_empty() {
        return Err(WebhookError::MalformedHeader);
    }
    // In i128: a hostile `t=-9223372036854775808` must not overflow the subtraction.
    if (i128::from(now) - i128::from(timestamp)).unsigned_abs() > u128::from(tolerance_secs) {
        return Err(WebhookError::StaleTimestamp);
    }
    let mut matched = false;
    for sig in &signatures {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| WebhookError::BadSignature)?;
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        // `verify_slice` compares in constant time.
        matched |= mac.verify_slice(sig).is_ok();
    }
    if matched {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// The signature header Stripe would send (for tests and the CLI's test command).
pub fn sign(payload: &[u8], secret: &str, timestamp: i64) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    object: serde_json::Value,
}

/// The events that can carry a paid Checkout Session.
const PAYMENT_EVENTS: [&str; 2] = ["checkout.session.completed", "checkout.session.async_payment_succeeded"];

/// What handling an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Credited {
        account_id: String,
        amount_nano_usd: i64,
    },
    /// The session was credited before: nothing done.
    Replay,
    /// Paid, but for no account the gateway can credit: kept for an operator.
    Unmatched(String),
    Ignored(&'static str),
}

/// What a verified event asks for, decided from its bytes alone (no store, no clock but the
/// receipt time of an unmatched payment): the part of [`handle_event`] that can be tested and
/// fuzzed on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Ignore(&'static str),
    /// Credit `amount_nano_usd` to `account_id`, once per `reference` (the session id). If the
    /// account does not exist, keep `if_unknown` instead.
    Credit {
        account_id: String,
        amount_nano_usd: i64,
        reference: String,
        if_unknown: UnmatchedPayment,
    },
    /// Paid, but for no account the gateway can credit.
    Unmatched(UnmatchedPayment),
}

/// Read a verified event and decide what it asks for.
pub fn parse_event(payload: &[u8]) -> Result<Decision, WebhookError> {
    let event: Event = serde_json::from_slice(payload).map_err(|e| WebhookError::BadEvent(e.to_string()))?;
    if !PAYMENT_EVENTS.contains(&event.kind.as_str()) {
        return Ok(Decision::Ignore("not a Checkout Session payment"));
    }
    let session = &event.data.object;
    // Only an explicit "paid" is a payment: "unpaid" (a delayed method still pending),
    // "no_payment_required" and a missing field are not.
    if session["payment_status"].as_str() != Some("paid") {
        return Ok(Decision::Ignore("not paid"));
    }
    let Some(cents) = session["amount_total"].as_i64().filter(|c| *c > 0) else {
        return Ok(Decision::Ignore("no positive amount_total"));
    };
    let currency = session["currency"].as_str().unwrap_or("");
    let account_ref = session["metadata"]["account_id"].as_str();
    let amount = cents
        .checked_mul(NANOS_PER_CENT)
        .ok_or(WebhookError::BadEvent("amount out of range".into()))?;
    let usd = currency.eq_ignore_ascii_case("usd");
    let unmatched = |reason: String| UnmatchedPayment {
        event_id: event.id.clone(),
        event_type: event.kind.clone(),
        account_ref: account_ref.map(|a| a.chars().take(64).collect()),
        amount_nano_usd: if usd { amount } else { 0 },
        reason,
        received_at: chrono::Utc::now(),
    };
    if !usd {
        let reason = format!("paid {cents} in the smallest unit of `{}`, not USD", bounded(currency));
        return Ok(Decision::Unmatched(unmatched(reason)));
    }
    let Some(account_id) = account_ref else {
        return Ok(Decision::Unmatched(unmatched("no metadata.account_id".into())));
    };
    // One credit per session, whichever of its events (or their retries) arrives.
    let reference = session["id"].as_str().unwrap_or(&event.id);
    Ok(Decision::Credit {
        account_id: account_id.to_owned(),
        amount_nano_usd: amount,
        reference: reference.to_owned(),
        if_unknown: unmatched("unknown account".into()),
    })
}

/// Handle a verified event.
pub async fn handle_event(store: &dyn Store, payload: &[u8]) -> Result<Outcome, WebhookError> {
    match parse_event(payload)? {
        Decision::Ignore(why) => Ok(Outcome::Ignored(why)),
        Decision::Unmatched(payment) => keep_unmatched(store, payment).await,
        Decision::Credit {
            account_id,
            amount_nano_usd,
            reference,
            if_unknown,
        } => match store.credit(&account_id, amount_nano_usd, "stripe", &reference).await {
            Ok((_, true)) => Ok(Outcome::Credited {
                account_id,
                amount_nano_usd,
            }),
            Ok((_, false)) => Ok(Outcome::Replay),
            Err(StoreError::NotFound(_)) => keep_unmatched(store, if_unknown).await,
            Err(e) => Err(WebhookError::Store(e)),
        },
    }
}

async fn keep_unmatched(store: &dyn Store, payment: UnmatchedPayment) -> Result<Outcome, WebhookError> {
    let new = store
        .keep_unmatched_payment(&payment)
        .await
        .map_err(WebhookError::Store)?;
    if new {
        METRICS.stripe_unmatched.inc();
        tracing::error!(
            event_id = %payment.event_id,
            account_ref = payment.account_ref.as_deref().unwrap_or(""),
            amount_nano_usd = payment.amount_nano_usd,
            "a paid Stripe checkout credited no wallet ({}); kept in the unmatched payments for an operator",
            payment.reason
        );
    }
    Ok(Outcome::Unmatched(payment.reason))
}

/// A client-controlled string cut for a log line or a stored reason.
fn bounded(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";

    #[test]
    fn signatures_verify_and_fail_precisely() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign(body, SECRET, 1_000);
        assert_eq!(verify_signature(&header, body, SECRET, 300, 1_100), Ok(()));
        assert_eq!(
            verify_signature(&header, body, SECRET, 300, 2_000),
            Err(WebhookError::StaleTimestamp)
        );
        assert_eq!(
            verify_signature(&header, b"{}", SECRET, 300, 1_000),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(&header, body, "whsec_other", 300, 1_000),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature("v1=00", body, SECRET, 300, 1_000),
            Err(WebhookError::MalformedHeader)
        );
        assert_eq!(
            verify_signature("t=1000", body, SECRET, 300, 1_000),
            Err(WebhookError::MalformedHeader)
        );
        // Timestamps at the ends of i64 are stale, not an overflow.
        for t in [i64::MIN, i64::MAX] {
            assert_eq!(
                verify_signature(&format!("t={t},v1=00"), body, SECRET, 300, 1_000),
                Err(WebhookError::StaleTimestamp)
            );
        }
        // Several v1 signatures (secret rotation): any one may match.
        let other = sign(body, "whsec_old", 1_000);
        let both = format!("{header},{}", other.split(',').nth(1).unwrap());
        assert_eq!(verify_signature(&both, body, "whsec_old", 300, 1_000), Ok(()));
    }

    #[test]
    fn events_are_decided_without_a_store() {
        let event = |kind: &str, object: serde_json::Value| {
            serde_json::json!({"id": "evt_1", "type": kind, "data": {"object": object}}).to_string()
        };
        let paid = |extra: serde_json::Value| {
            let mut o = serde_json::json!({"id": "cs_1", "payment_status": "paid", "amount_total": 1250,
                                           "currency": "usd", "metadata": {"account_id": "acct_1"}});
            for (k, v) in extra.as_object().unwrap() {
                o[k] = v.clone();
            }
            o
        };
        let decide = |body: String| parse_event(body.as_bytes());
        match decide(event("checkout.session.completed", paid(serde_json::json!({})))).unwrap() {
            Decision::Credit {
                account_id,
                amount_nano_usd,
                reference,
                if_unknown,
            } => {
                assert_eq!(
                    (account_id.as_str(), amount_nano_usd, reference.as_str()),
                    ("acct_1", 12_500_000_000, "cs_1")
                );
                assert_eq!(if_unknown.reason, "unknown account");
            }
            other => panic!("{other:?}"),
        }
        let ignored = [
            event("invoice.paid", paid(serde_json::json!({}))),
            event(
                "checkout.session.completed",
                paid(serde_json::json!({"payment_status": "unpaid"})),
            ),
            event(
                "checkout.session.completed",
                paid(serde_json::json!({"amount_total": 0})),
            ),
            event(
                "checkout.session.completed",
                paid(serde_json::json!({"amount_total": "1250"})),
            ),
        ];
        for body in ignored {
            assert!(matches!(decide(body.clone()), Ok(Decision::Ignore(_))), "{body}");
        }
        let eur = decide(event(
            "checkout.session.completed",
            paid(serde_json::json!({"currency": "eur"})),
        ))
        .unwrap();
        assert!(matches!(eur, Decision::Unmatched(p) if p.amount_nano_usd == 0 && p.reason.contains("`eur`")));
        let huge = event(
            "checkout.session.completed",
            paid(serde_json::json!({"amount_total": i64::MAX})),
        );
        assert!(matches!(decide(huge), Err(WebhookError::BadEvent(_))));
        assert!(matches!(decide("{".into()), Err(WebhookError::BadEvent(_))));
    }
}
