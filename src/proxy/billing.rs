//! Money on the request path: the hold before forwarding (step 4) and, right before the last
//! byte of the answer goes out, the settlement and the usage record (step 8). Both run in the
//! engine, not in a plugin: they keep the wallet's invariants, and the record must be durable
//! before the client can see its answer end, which no plugin hook is placed to guarantee.

use super::{Gateway, RequestCtx};
use crate::billing::wallet::{WalletBook, WalletError};
use crate::metering::tokens::count_chat_prompt;
use crate::metrics::METRICS;
use crate::money::token_cost;
use crate::usage::spool::UsageSpool;
use crate::usage::UsageRecord;
use komilion_sdk::{ApiError, ChatRequest, ErrorKind, LocalResponse, Principal, RoutePlan};
use std::sync::Arc;
use std::time::Instant;

/// Wallets and the usage log, when the gateway has a store.
#[derive(Clone)]
pub struct Billing {
    pub wallets: Arc<WalletBook>,
    pub spool: Arc<UsageSpool>,
}

/// Tokens the prompt cannot exceed, without tokenizing it: byte-level BPE tokens cover at least
/// one byte each, plus the chat template's overhead per message.
fn prompt_bound(chat: &ChatRequest) -> u64 {
    chat.messages
        .iter()
        .map(|m| m.text.len() as u64 + m.role.len() as u64 + 8)
        .sum::<u64>()
        + 16
}

impl Gateway {
    /// The most the request can cost on any candidate of the plan, for a given prompt size.
    fn max_cost(&self, chat: &ChatRequest, plan: &RoutePlan, prompt_tokens: impl Fn(&str) -> u64, cap: u64) -> i64 {
        plan.candidates
            .iter()
            .map(|c| {
                let price = self.pricing.price(&c.provider, &c.model).unwrap_or_default();
                let model_limit = self.pricing.model(&c.model).map_or(0, |m| m.max_output_tokens);
                // Each of the `n` answers may use the whole output cap.
                let max_out = chat
                    .max_tokens
                    .unwrap_or(if model_limit > 0 { model_limit.min(cap) } else { cap })
                    .saturating_mul(chat.choices);
                token_cost(prompt_tokens(&c.model), price.input).saturating_add(token_cost(max_out, price.output))
            })
            .max()
            .unwrap_or(0)
    }

    /// Hold the request's maximum cost on its account's wallet, or refuse it: when no candidate
    /// has a price (no request is charged $0 by accident), when its usage could not be recorded
    /// (the spool cannot be appended: fail closed rather than serve it unbilled), or when the
    /// wallet cannot cover it.
    pub(super) async fn hold(
        &self,
        ctx: &mut RequestCtx,
        chat: &ChatRequest,
        plan: &mut RoutePlan,
    ) -> Result<(), LocalResponse> {
        let (
            Some(billing),
            Some(Principal {
                account_id,
                prepaid: true,
                ..
            }),
        ) = (&self.billing, &ctx.exchange.principal)
        else {
            return Ok(());
        };
        plan.candidates
            .retain(|c| self.pricing.price(&c.provider, &c.model).is_some());
        if plan.candidates.is_empty() {
            METRICS.wallet_rejections.with_label_values(&["unpriced"]).inc();
            return Err(ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "The model `{}` has no price on this gateway, so it cannot be billed to your wallet.",
                    chat.model
                ),
            )
            .with_code("model_not_priced")
            .with_param("model")
            .into());
        }
        if !billing.spool.accepting() {
            METRICS.wallet_rejections.with_label_values(&["usage_log"]).inc();
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                "Usage cannot be recorded right now, so paid requests are paused; retry shortly.",
            )
            .with_code("usage_log_unavailable")
            .with_retry_after(5)
            .into());
        }
        let cap = billing.wallets.settings().max_output_tokens;
        // First with a bound that needs no tokenizer; only if the wallet is tight, with the
        // real prompt count.
        let loose = self.max_cost(chat, plan, |_| prompt_bound(chat), cap);
        let mut result = billing.wallets.hold(account_id, loose).await;
        if result == Err(WalletError::Insufficient) {
            let exact = self.max_cost(chat, plan, |model| count_chat_prompt(model, &chat.messages), cap);
            if exact < loose {
                result = billing.wallets.hold(account_id, exact).await;
            }
        }
        match result {
            Ok(hold) => {
                ctx.hold = Some(hold);
                Ok(())
            }
            Err(WalletError::Insufficient) => {
                METRICS.wallet_rejections.with_label_values(&["insufficient"]).inc();
                Err(ApiError::new(
                    ErrorKind::InsufficientQuota,
                    "You exceeded your current quota, please check your plan and billing details.",
                )
                .with_code("insufficient_quota")
                .into())
            }
            Err(WalletError::Disabled) => {
                METRICS.wallet_rejections.with_label_values(&["disabled"]).inc();
                Err(ApiError::new(ErrorKind::PermissionDenied, "The account is disabled.")
                    .with_code("account_disabled")
                    .into())
            }
            Err(WalletError::Unavailable(e)) => {
                METRICS.wallet_rejections.with_label_values(&["unavailable"]).inc();
                Err(
                    ApiError::store_unavailable(format!("The wallet cannot be checked right now: {e}"))
                        .with_retry_after(1)
                        .into(),
                )
            }
        }
    }

    /// Settle the hold and append the usage record, once per request. Called right before the
    /// last bytes of the answer are written (and from `logging` for paths that wrote nothing).
    pub(super) fn finish_usage(&self, ctx: &mut RequestCtx, status: u16) {
        if ctx.recorded {
            return;
        }
        ctx.recorded = true;
        if !ctx.route.is_metered() {
            return;
        }
        let ex = &ctx.exchange;
        let model = ex.routed_model.as_deref().unwrap_or("");
        let cost = match ex.provider.as_deref() {
            // Sent with the account's own provider key: the provider bills the account.
            Some(_) if ctx.account_key_used => 0,
            Some(provider) => {
                let price = self.pricing.price(provider, model).unwrap_or_default();
                crate::metering::cost(&price, &ex.usage)
            }
            None => 0,
        };
        if ex.usage.input_tokens > 0 || ex.usage.output_tokens > 0 {
            let labels = [
                ex.provider.as_deref().unwrap_or(""),
                self.models.metric_label(model, &self.pricing),
                ex.task.as_deref().unwrap_or(""),
            ];
            METRICS
                .tokens
                .with_label_values(&[labels[0], labels[1], labels[2], "input"])
                .inc_by(ex.usage.input_tokens);
            METRICS
                .tokens
                .with_label_values(&[labels[0], labels[1], labels[2], "output"])
                .inc_by(ex.usage.output_tokens);
            METRICS.cost.with_label_values(&labels).inc_by(cost.max(0) as u64);
        }
        let (Some(billing), Some(principal)) = (&self.billing, &ex.principal) else {
            return;
        };
        let settlement = match ctx.hold.take() {
            Some(hold) => billing.wallets.settle(&hold, cost),
            None => Default::default(),
        };
        let now = Instant::now();
        let record = UsageRecord {
            request_id: ex.request_id.clone(),
            account_id: principal.account_id.clone(),
            key_id: Some(principal.key_id.clone()),
            created_at: chrono::Utc::now(),
            route: ctx.route.label().to_owned(),
            requested_model: ex.requested_model.clone(),
            routed_model: ex.routed_model.clone(),
            provider: ex.provider.clone(),
            task: ex.task.clone(),
            status,
            input_tokens: ex.usage.input_tokens,
            output_tokens: ex.usage.output_tokens,
            cached_tokens: ex.usage.cached_input_tokens,
            reasoning_tokens: ex.usage.reasoning_tokens,
            cost_nano_usd: cost,
            unbilled_nano_usd: if principal.prepaid { settlement.unbilled } else { 0 },
            estimated: ex.usage.estimated,
            latency_ms: now.saturating_duration_since(ex.timing.started).as_millis() as u64,
            ttfb_ms: ex.timing.upstream_first_byte.map(|d| d.as_millis() as u64),
            cache_hit: ex.cache_hit,
            lease_id: settlement.lease_id,
            end_user: ex.end_user.clone(),
        }
        .bounded();
        if let Err(e) = billing.spool.append(&record) {
            METRICS.spool_errors.inc();
            tracing::error!(request_id = %record.request_id, "cannot append the usage record: {e}");
        }
    }
}
