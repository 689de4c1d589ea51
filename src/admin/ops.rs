//! The admin operations, shared by the HTTP admin API and `komilion admin`: the same checks and
//! the same JSON either way.

use crate::money::{parse_plain_usd, Usd};
use crate::secrets::MasterKeys;
use crate::store::{generate_api_key, new_id, Account, AccountStatus, KeyInfo, KeyLimits, Store, StoreError, Wallet};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest single top-up accepted, in USD (a typo guard).
const MAX_TOP_UP_USD: i64 = 1_000_000;

/// Longest provider name the admin API takes.
const MAX_PROVIDER_NAME: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl OpError {
    pub fn status(&self) -> u16 {
        match self {
            OpError::BadRequest(_) => 400,
            OpError::NotFound(_) => 404,
            OpError::Conflict(_) => 409,
            OpError::Unavailable(_) => 503,
            OpError::Internal(_) => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            OpError::BadRequest(_) => "invalid_request",
            OpError::NotFound(_) => "not_found",
            OpError::Conflict(_) => "conflict",
            OpError::Unavailable(_) => "store_unavailable",
            OpError::Internal(_) => "internal_error",
        }
    }

    /// `{"error": {"message", "type", "code"}}`.
    pub fn to_json(&self) -> Value {
        let kind = match self {
            OpError::Unavailable(_) | OpError::Internal(_) => "api_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.to_string(), "type": kind, "code": self.code()}})
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => OpError::NotFound(format!("{what} not found")),
            StoreError::Conflict(m) => OpError::Conflict(m),
            StoreError::Invalid(m) | StoreError::Rejected(m) => OpError::BadRequest(m),
            StoreError::Unavailable(m) => OpError::Unavailable(format!("the store is unavailable: {m}")),
            StoreError::Internal(m) => OpError::Internal(m),
        }
    }
}

pub type OpResult = Result<Value, OpError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    pub email: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub allowed_models: Vec<String>,
    #[serde(default)]
    pub rpm_limit: Option<u32>,
    #[serde(default)]
    pub tpm_limit: Option<u32>,
    /// What the key is expected to spend, a plain decimal string; alerts fire at a share of it.
    #[serde(default)]
    pub budget_usd: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopUp {
    /// A plain decimal string, e.g. `"12.50"` (a JSON number is refused: it may not be exact;
    /// so is an exponent: `"1e3"` is not what anyone means by a top-up).
    pub amount_usd: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    pub status: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutProviderKey {
    pub api_key: String,
}

pub fn account_json(a: &Account) -> Value {
    json!({"id": a.id, "object": "account", "name": a.name, "email": a.email, "status": a.status, "created_at": a.created_at})
}

pub fn key_json(k: &KeyInfo) -> Value {
    json!({
        "id": k.id, "object": "api_key", "account_id": k.account_id, "name": k.name, "prefix": k.prefix,
        "created_at": k.created_at, "last_used_at": k.last_used_at, "expires_at": k.expires_at,
        "revoked_at": k.revoked_at, "allowed_models": k.allowed_models,
        "rpm_limit": k.rpm_limit, "tpm_limit": k.tpm_limit,
        "budget_usd": k.budget_nano_usd.map(|b| Usd(b).to_string()), "spent_usd": Usd(k.spent_nano_usd).to_string(),
    })
}

pub fn wallet_json(w: &Wallet) -> Value {
    json!({
        "account_id": w.account_id, "object": "wallet",
        "balance_usd": Usd(w.balance_nano_usd).to_string(), "balance_nano_usd": w.balance_nano_usd,
        "leased_nano_usd": w.leased_nano_usd, "credited_usd": Usd(w.credited_nano_usd).to_string(),
        "spent_usd": Usd(w.spent_nano_usd).to_string(), "updated_at": w.updated_at,
    })
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty() && domain.contains('.') && email.len() <= 254 && !email.chars().any(char::is_whitespace)
}

pub async fn create_account(store: &dyn Store, body: CreateAccount) -> OpResult {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(OpError::BadRequest("`name` must be 1 to 200 characters".into()));
    }
    if !valid_email(body.email.trim()) {
        return Err(OpError::BadRequest("`email` is not an email address".into()));
    }
    Ok(account_json(&store.create_account(name, body.email.trim()).await?))
}

pub async fn get_account(store: &dyn Store, id: &str) -> OpResult {
    Ok(account_json(&store.get_account(id).await?))
}

pub async fn list_accounts(store: &dyn Store, limit: u32, after: Option<&str>) -> OpResult {
    let limit = limit.clamp(1, 1000);
    let accounts = store.list_accounts(limit + 1, after).await?;
    let has_more = accounts.len() > limit as usize;
    let data: Vec<Value> = accounts.iter().take(limit as usize).map(account_json).collect();
    Ok(json!({"object": "list", "data": data, "has_more": has_more}))
}

pub async fn update_account(store: &dyn Store, id: &str, body: UpdateAccount) -> OpResult {
    let status = match body.status.as_str() {
        "active" => AccountStatus::Active,
        "disabled" => AccountStatus::Disabled,
        other => {
            return Err(OpError::BadRequest(format!(
                "`status` must be active or disabled, not `{other}`"
            )))
        }
    };
    let current = store.get_account(id).await?;
    if current.status == AccountStatus::Erased {
        return Err(OpError::Conflict("the account was erased".into()));
    }
    Ok(account_json(&store.set_account_status(id, status).await?))
}

pub async fn create_key(store: &dyn Store, account_id: &str, body: CreateKey) -> OpResult {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(OpError::BadRequest("`name` must be 1 to 200 characters".into()));
    }
    if body.expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(OpError::BadRequest("`expires_at` is in the past".into()));
    }
    if body.rpm_limit == Some(0) || body.tpm_limit == Some(0) {
        return Err(OpError::BadRequest(
            "limits must be at least 1 (leave them out for no limit)".into(),
        ));
    }
    let budget = match &body.budget_usd {
        Some(text) => match parse_plain_usd(text) {
            Ok(n) if n > 0 => Some(n),
            Ok(_) => return Err(OpError::BadRequest("`budget_usd` must be above 0".into())),
            Err(e) => return Err(OpError::BadRequest(format!("`budget_usd`: {e}"))),
        },
        None => None,
    };
    let limits = KeyLimits {
        expires_at: body.expires_at,
        allowed_models: body.allowed_models,
        rpm_limit: body.rpm_limit,
        tpm_limit: body.tpm_limit,
        budget_nano_usd: budget,
    };
    let (secret, digest, prefix) = generate_api_key();
    let info = store.create_key(account_id, name, digest, &prefix, &limits).await?;
    let mut out = key_json(&info);
    // The only time the key is ever shown.
    out["key"] = Value::String(secret);
    Ok(out)
}

pub async fn list_keys(store: &dyn Store, account_id: &str) -> OpResult {
    let keys = store.list_keys(account_id).await?;
    Ok(json!({"object": "list", "data": keys.iter().map(key_json).collect::<Vec<_>>()}))
}

pub async fn revoke_key(store: &dyn Store, key_id: &str) -> Result<(), OpError> {
    Ok(store.revoke_key(key_id).await?)
}

/// Paid top-ups that credited no wallet, newest first (the last 1,000).
pub async fn unmatched_payments(store: &dyn Store) -> OpResult {
    let payments = store.unmatched_payments(1000).await?;
    Ok(json!({"object": "list", "data": payments}))
}

pub async fn wallet(store: &dyn Store, account_id: &str) -> OpResult {
    Ok(wallet_json(&store.wallet(account_id).await?))
}

/// Credit `amount_usd`; `reference` (an idempotency key) makes a retried call a no-op.
pub async fn top_up(store: &dyn Store, account_id: &str, body: TopUp, reference: Option<&str>) -> OpResult {
    let amount = parse_plain_usd(&body.amount_usd).map_err(|e| OpError::BadRequest(format!("`amount_usd`: {e}")))?;
    if amount <= 0 || amount > MAX_TOP_UP_USD * crate::money::NANOS_PER_USD {
        return Err(OpError::BadRequest(format!(
            "`amount_usd` must be above 0 and at most {MAX_TOP_UP_USD}"
        )));
    }
    let reference = reference.map_or_else(|| new_id("topup"), str::to_owned);
    let (wallet, credited) = store.credit(account_id, amount, "admin", &reference).await?;
    let mut out = wallet_json(&wallet);
    out["credited"] = Value::Bool(credited);
    Ok(out)
}

/// A provider name as the admin API takes it: `[a-z0-9_-]{1,64}`. The name is a URL path
/// segment, part of the sealed key's context and a column in the store; anything outside this
/// set (`%2F`, spaces, upper case that would not match the config's name) is a typo or an
/// attempt to smuggle something into a path or a log, and is refused before the store sees it.
pub fn check_provider_name(name: &str) -> Result<(), OpError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_PROVIDER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        return Ok(());
    }
    let shown: String = name
        .chars()
        .take(MAX_PROVIDER_NAME)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    Err(OpError::BadRequest(format!(
        "provider name `{shown}` must be 1 to {MAX_PROVIDER_NAME} characters of a-z, 0-9, `_` and `-`"
    )))
}

pub async fn put_provider_key(
    store: &dyn Store,
    keys: Option<&MasterKeys>,
    account_id: &str,
    provider: &str,
    body: PutProviderKey,
) -> Result<(), OpError> {
    check_provider_name(provider)?;
    let keys = keys.ok_or_else(|| {
        OpError::BadRequest(
            "provider keys need a master key: set KOMILION_MASTER_KEY in the gateway's environment".into(),
        )
    })?;
    if body.api_key.trim().is_empty() {
        return Err(OpError::BadRequest("`api_key` must not be empty".into()));
    }
    let sealed = keys.seal(body.api_key.trim().as_bytes(), account_id, provider);
    Ok(store.put_provider_key(account_id, provider, &sealed).await?)
}

pub async fn list_provider_keys(store: &dyn Store, account_id: &str) -> OpResult {
    let keys = store.list_provider_keys(account_id).await?;
    Ok(json!({"object": "list", "data": keys}))
}

pub async fn delete_provider_key(store: &dyn Store, account_id: &str, provider: &str) -> Result<(), OpError> {
    check_provider_name(provider)?;
    Ok(store.delete_provider_key(account_id, provider).await?)
}

/// Re-seal every provider key with the current master key (the first of
/// `KOMILION_MASTER_KEYS`). Returns how many were re-sealed.
pub async fn reseal_provider_keys(store: &dyn Store, keys: &MasterKeys) -> OpResult {
    let mut resealed = 0;
    for (account_id, provider, sealed) in store.all_provider_keys().await? {
        if sealed.key_version == keys.current_version() {
            continue;
        }
        let plain = keys
            .open(&sealed, &account_id, &provider)
            .map_err(|e| OpError::BadRequest(format!("{account_id}/{provider}: {e}")))?;
        store
            .put_provider_key(&account_id, &provider, &keys.seal(&plain, &account_id, &provider))
            .await?;
        resealed += 1;
    }
    Ok(json!({"resealed": resealed, "key_version": keys.current_version()}))
}

/// Erase an account: personal data and keys go, billing rows stay (anonymised).
pub async fn erase_account(store: &dyn Store, account_id: &str) -> Result<(), OpError> {
    Ok(store.erase_account(account_id).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_are_lower_case_words() {
        for good in ["openai", "azure-eu_2", "a", &"x".repeat(64)] {
            assert_eq!(check_provider_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "OpenAI",
            "open ai",
            "open%2Fai",
            "../x",
            "a/b",
            "é",
            "a\u{0}",
            &"x".repeat(65),
        ] {
            let err = check_provider_name(bad).unwrap_err();
            assert_eq!(err.status(), 400, "{bad:?}");
            assert!(err.to_string().contains("a-z, 0-9"), "{err}");
            assert!(!err.to_string().contains('\0'), "control characters are not echoed");
        }
    }
}
