//! `jwt_auth`: bearer JWTs from your identity provider.
//!
//! Accepts HS256 (a shared secret) or RS256/ES256 (public keys from a PEM file or a JWKS file,
//! chosen by the token's `kid`). Signature, `exp` and `nbf` (with leeway), and, when configured,
//! `iss`, `aud` and a maximum lifetime are checked. A configured claim names the account;
//! another may narrow the models the caller can use. A refused token gets a 401 whose reason
//! says which check failed and nothing about the keys.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use komilion_sdk::{
    settings_from, AccountLookup, ApiError, ConfigIssue, ErrorKind, Exchange, Flow, Hooks, Plugin, PluginServices,
    PluginSettings, Principal, RequestView,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

pub const NAME: &str = "jwt_auth";

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct JwtAuthSettings {
    /// HS256 shared secret (use `${ENV}`).
    pub hs256_secret: Option<String>,
    /// A PEM file with an RSA or EC public key (RS256 / ES256).
    pub public_key_file: Option<String>,
    /// A JWKS file (`{"keys": [...]}`); the token's `kid` picks the key.
    pub jwks_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim that names the account charged.
    pub account_claim: String,
    /// A claim listing the models the caller may use (array, or space-separated string).
    pub models_claim: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
    /// Refuse tokens that live longer than this: `exp - iat`, or, for a token without `iat`,
    /// what is left of it (`exp - now`). A leaked long-lived token is a standing credential;
    /// this caps what an identity provider misconfigured to mint them can hand out.
    pub max_lifetime_secs: Option<u64>,
    /// Leave credentials that are not JWTs to the next auth plugin.
    pub fallthrough: bool,
    /// Refuse tokens whose account is not in the store (when there is one).
    pub require_account: bool,
    /// Rate limits for JWT callers (keys carry their own).
    pub rpm_limit: Option<u32>,
    pub tpm_limit: Option<u32>,
}

impl Default for JwtAuthSettings {
    fn default() -> Self {
        JwtAuthSettings {
            hs256_secret: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            account_claim: "sub".into(),
            models_claim: None,
            leeway_secs: 30,
            max_lifetime_secs: None,
            fallthrough: false,
            require_account: true,
            rpm_limit: None,
            tpm_limit: None,
        }
    }
}

/// Where the verifying keys come from.
enum Keys {
    Hs256(DecodingKey),
    /// One public key, and the algorithm it is for.
    Public(DecodingKey, Algorithm),
    /// JWKS keys by `kid`.
    Set(HashMap<String, (DecodingKey, Algorithm)>),
}

pub struct JwtAuth {
    keys: Keys,
    settings: JwtAuthSettings,
    accounts: Option<Arc<dyn AccountLookup>>,
}

fn issue(path: &str, message: impl Into<String>) -> Vec<ConfigIssue> {
    vec![ConfigIssue::new(path, message)]
}

impl JwtAuthSettings {
    /// Settings that work but are likely not what the operator wants (`komilion check` prints
    /// them). Without `issuer` any issuer whose key verifies is trusted; without `audience` a
    /// token the same identity provider minted for another service is accepted here.
    pub fn warnings(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        if self.issuer.is_none() {
            out.push(ConfigIssue::new(
                "issuer",
                "not set: tokens are accepted whatever their `iss`; set it to your identity provider's issuer",
            ));
        }
        if self.audience.is_none() {
            out.push(ConfigIssue::new(
                "audience",
                "not set: tokens your identity provider issued for other services are accepted too; \
                 set it to the `aud` it issues for this gateway",
            ));
        }
        out
    }
}

/// The warnings of a `jwt_auth` settings block, or none when it does not parse (building the
/// chain reports that as an error).
pub fn warnings(settings: &PluginSettings) -> Vec<ConfigIssue> {
    settings_from::<JwtAuthSettings>(settings).map_or_else(|_| Vec::new(), |s| s.warnings())
}

fn load_public_key(path: &str) -> Result<(DecodingKey, Algorithm), Vec<ConfigIssue>> {
    let pem = std::fs::read(path).map_err(|e| issue("public_key_file", format!("{path}: {e}")))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    DecodingKey::from_ec_pem(&pem)
        .map(|key| (key, Algorithm::ES256))
        .map_err(|_| issue("public_key_file", format!("{path}: not an RSA or EC public key in PEM")))
}

fn load_jwks(path: &str) -> Result<HashMap<String, (DecodingKey, Algorithm)>, Vec<ConfigIssue>> {
    let text = std::fs::read_to_string(path).map_err(|e| issue("jwks_file", format!("{path}: {e}")))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| issue("jwks_file", format!("{path}: {e}")))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        let algorithm = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| issue("jwks_file", format!("{path}: key `{kid}`: {e}")))?;
        keys.insert(kid, (key, algorithm));
    }
    if keys.is_empty() {
        return Err(issue("jwks_file", format!("{path}: no RSA or EC key with a `kid`")));
    }
    Ok(keys)
}

impl JwtAuth {
    pub fn new(
        settings: JwtAuthSettings,
        accounts: Option<Arc<dyn AccountLookup>>,
    ) -> Result<JwtAuth, Vec<ConfigIssue>> {
        let sources = [
            settings.hs256_secret.is_some(),
            settings.public_key_file.is_some(),
            settings.jwks_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(issue("", "set exactly one of hs256_secret, public_key_file, jwks_file"));
        }
        if settings.max_lifetime_secs == Some(0) {
            return Err(issue(
                "max_lifetime_secs",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        let keys = if let Some(secret) = &settings.hs256_secret {
            if secret.len() < 32 {
                return Err(issue("hs256_secret", "use at least 32 bytes of secret"));
            }
            Keys::Hs256(DecodingKey::from_secret(secret.as_bytes()).map_err(|e| issue("hs256_secret", e.to_string()))?)
        } else if let Some(path) = &settings.public_key_file {
            let (key, alg) = load_public_key(path)?;
            Keys::Public(key, alg)
        } else if let Some(path) = &settings.jwks_file {
            Keys::Set(load_jwks(path)?)
        } else {
            return Err(issue("", "no key configured"));
        };
        Ok(JwtAuth {
            keys,
            settings,
            accounts,
        })
    }

    pub fn build(settings: &PluginSettings, services: &PluginServices) -> Result<Arc<dyn Plugin>, Vec<ConfigIssue>> {
        Ok(Arc::new(JwtAuth::new(
            settings_from(settings)?,
            services.accounts.clone(),
        )?))
    }

    /// Verify the token and return its claims, or the reason for the refusal.
    fn verify(&self, token: &str) -> Result<serde_json::Map<String, serde_json::Value>, &'static str> {
        let header = decode_header(token).map_err(|_| "the token is malformed")?;
        let (key, algorithm) = match &self.keys {
            Keys::Hs256(key) => (key, Algorithm::HS256),
            Keys::Public(key, alg) => (key, *alg),
            Keys::Set(keys) => {
                let kid = header.kid.as_deref().ok_or("the token names no key (`kid`)")?;
                let (key, alg) = keys.get(kid).ok_or("the token's key (`kid`) is unknown")?;
                (key, *alg)
            }
        };
        if header.alg != algorithm {
            return Err("the token's algorithm is not accepted");
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &self.settings.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as E;
            match e.kind() {
                E::ExpiredSignature => "the token has expired",
                E::ImmatureSignature => "the token is not valid yet",
                E::InvalidIssuer => "the token's issuer is not accepted",
                E::InvalidAudience => "the token's audience is not accepted",
                E::InvalidSignature => "the token's signature does not verify",
                E::MissingRequiredClaim(_) => "the token lacks a required claim",
                E::InvalidAlgorithm | E::InvalidAlgorithmName => "the token's algorithm is not accepted",
                _ => "the token is malformed",
            }
        })?;
        if let Some(max) = self.settings.max_lifetime_secs {
            check_lifetime(&data.claims, max, self.settings.leeway_secs, unix_now())?;
        }
        Ok(data.claims)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A JWT NumericDate: seconds since the epoch, possibly with a fraction (RFC 7519 §2).
fn numeric_date(value: &serde_json::Value) -> Option<i128> {
    match value.as_u64() {
        Some(n) => Some(n.into()),
        None => value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as i128),
    }
}

/// Refuse a token that lives longer than `max` seconds. With `iat`, the lifetime is
/// `exp - iat`, and an `iat` in the future (beyond the leeway) is refused: it would shorten the
/// lifetime on paper. Without `iat`, what is left of the token (`exp - now`) must fit: a token
/// minted without `iat` cannot outlive the limit from the moment it is used either.
fn check_lifetime(
    claims: &serde_json::Map<String, serde_json::Value>,
    max: u64,
    leeway: u64,
    now: u64,
) -> Result<(), &'static str> {
    // `exp` is required and was checked by `decode`.
    let exp = claims
        .get("exp")
        .and_then(numeric_date)
        .ok_or("the token is malformed")?;
    let (now, max, leeway) = (i128::from(now), i128::from(max), i128::from(leeway));
    let too_long = match claims.get("iat") {
        Some(iat) => {
            let iat = numeric_date(iat).ok_or("the token's `iat` is not a time")?;
            if iat > now + leeway {
                return Err("the token's `iat` is in the future");
            }
            exp - iat > max
        }
        None => exp - now > max + leeway,
    };
    if too_long {
        return Err("the token's lifetime exceeds the maximum this gateway accepts");
    }
    Ok(())
}

/// A compact JWS: three base64url parts, the first a JSON header.
fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.split('.').count() == 3
}

fn refuse(reason: &str) -> Flow {
    Flow::error(
        ApiError::new(ErrorKind::Authentication, format!("Invalid token: {reason}.")).with_code("invalid_token"),
    )
}

fn models_from(claim: &serde_json::Value) -> Vec<String> {
    match claim {
        serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        serde_json::Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

#[async_trait::async_trait]
impl Plugin for JwtAuth {
    fn name(&self) -> &'static str {
        NAME
    }

    fn hooks(&self) -> Hooks {
        Hooks::ON_HEADERS
    }

    fn authenticates(&self) -> bool {
        true
    }

    async fn on_headers(&self, req: &RequestView, ex: &mut Exchange) -> Flow {
        if ex.principal.is_some() {
            return Flow::Continue;
        }
        let token = match req.credential() {
            Some(c) if looks_like_jwt(c) => c,
            _ if self.settings.fallthrough => return Flow::Continue,
            Some(_) => return refuse("not a JWT"),
            None => return Flow::error(ApiError::missing_api_key()),
        };
        let claims = match self.verify(token) {
            Ok(claims) => claims,
            Err(reason) => return refuse(reason),
        };
        let Some(account_id) = claims
            .get(&self.settings.account_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
        else {
            return refuse("the account claim is missing");
        };
        if self.settings.require_account {
            if let Some(accounts) = &self.accounts {
                match accounts.account_active(account_id).await {
                    Ok(Some(true)) => {}
                    Ok(Some(false)) => {
                        return Flow::error(
                            ApiError::new(ErrorKind::PermissionDenied, "The account of this token is disabled.")
                                .with_code("account_disabled"),
                        )
                    }
                    Ok(None) => return refuse("the token's account does not exist"),
                    Err(_) => {
                        return Flow::error(
                            ApiError::store_unavailable("Accounts cannot be checked right now; retry shortly.")
                                .with_retry_after(1),
                        )
                    }
                }
            }
        }
        let allowed_models = self
            .settings
            .models_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .map(models_from)
            .unwrap_or_default();
        let subject = claims.get("sub").and_then(|v| v.as_str()).unwrap_or(account_id);
        ex.principal = Some(Principal {
            account_id: account_id.to_owned(),
            key_id: format!("jwt:{subject}"),
            allowed_models,
            rpm_limit: self.settings.rpm_limit,
            tpm_limit: self.settings.tpm_limit,
            prepaid: self.accounts.is_some(),
        });
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method};
    use jsonwebtoken::{encode, EncodingKey, Header};
    use komilion_sdk::{LocalResponse, Surface};
    use std::time::Instant;

    const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!!";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn plugin() -> JwtAuth {
        let settings = serde_json::json!({
            "hs256_secret": SECRET, "issuer": "https://idp.example", "audience": "komilion",
            "account_claim": "org", "models_claim": "models"
        });
        JwtAuth::new(settings_from(&settings).unwrap(), None).unwrap()
    }

    async fn call(p: &JwtAuth, token: &str) -> Result<Principal, (u16, String)> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let mut ex = Exchange::new("r".into(), Surface::OpenAi, Instant::now());
        match p
            .on_headers(&RequestView::new(Method::POST, "/", headers), &mut ex)
            .await
        {
            Flow::Continue => Ok(ex.principal.unwrap()),
            Flow::Respond(LocalResponse::Error(e)) => Err((e.status(), e.message)),
            Flow::Respond(_) => panic!("unexpected"),
        }
    }

    fn good() -> serde_json::Value {
        serde_json::json!({"sub": "user-1", "org": "acct_42", "iss": "https://idp.example", "aud": "komilion",
                           "exp": now() + 600, "nbf": now() - 10, "models": ["gpt-4o-mini"]})
    }

    #[tokio::test]
    async fn a_valid_token_names_the_account_and_narrows_models() {
        let p = plugin();
        let principal = call(&p, &token(good(), SECRET)).await.unwrap();
        assert_eq!(principal.account_id, "acct_42");
        assert_eq!(principal.key_id, "jwt:user-1");
        assert_eq!(principal.allowed_models, ["gpt-4o-mini"]);
    }

    #[tokio::test]
    async fn every_failed_check_is_a_401_with_its_reason() {
        let p = plugin();
        let with = |k: &str, v: serde_json::Value| {
            let mut c = good();
            c[k] = v;
            c
        };
        let cases = [
            (token(good(), "another-secret-that-is-32-bytes-long!!"), "signature"),
            (token(with("exp", (now() - 3600).into()), SECRET), "expired"),
            (token(with("nbf", (now() + 3600).into()), SECRET), "not valid yet"),
            (token(with("iss", "https://evil".into()), SECRET), "issuer"),
            (token(with("aud", "someone-else".into()), SECRET), "audience"),
            (token(with("org", serde_json::Value::Null), SECRET), "account claim"),
            ("eyJhbGciOiJIUzI1NiJ9.garbage.x".to_owned(), "malformed"),
        ];
        for (t, reason) in cases {
            let (status, message) = call(&p, &t).await.unwrap_err();
            assert_eq!(status, 401);
            assert!(message.contains(reason), "{message} should mention {reason}");
            assert!(!message.contains(SECRET));
        }
    }

    #[tokio::test]
    async fn a_maximum_lifetime_refuses_long_lived_tokens() {
        let settings = serde_json::json!({
            "hs256_secret": SECRET, "issuer": "https://idp.example", "audience": "komilion",
            "account_claim": "org", "max_lifetime_secs": 3600
        });
        let p = JwtAuth::new(settings_from(&settings).unwrap(), None).unwrap();
        // One clock reading for every claim: lifetimes are compared to the second.
        let t = now();
        let with = |pairs: &[(&str, serde_json::Value)]| {
            let mut c = good();
            c.as_object_mut().unwrap().remove("nbf");
            for (k, v) in pairs {
                c[*k] = v.clone();
            }
            token(c, SECRET)
        };
        let ok = [
            with(&[("iat", t.into()), ("exp", (t + 3600).into())]),
            // Issued a while ago, expiring soon: the lifetime is what counts, not what is left.
            with(&[("iat", (t - 3000).into()), ("exp", (t + 600).into())]),
            // No `iat`: what is left of it fits.
            with(&[("exp", (t + 600).into())]),
            // A fractional NumericDate.
            with(&[("iat", (t as f64 + 0.5).into()), ("exp", (t + 60).into())]),
        ];
        for tok in ok {
            call(&p, &tok).await.expect("within the maximum lifetime");
        }
        let refused = [
            (with(&[("iat", t.into()), ("exp", (t + 3601).into())]), "lifetime"),
            (
                with(&[("iat", (t - 86_400).into()), ("exp", (t + 60).into())]),
                "lifetime",
            ),
            (with(&[("exp", (t + 7200).into())]), "lifetime"),
            (
                with(&[("iat", (t + 600).into()), ("exp", (t + 900).into())]),
                "`iat` is in the future",
            ),
            (with(&[("iat", "yesterday".into())]), "`iat` is not a time"),
        ];
        for (tok, reason) in refused {
            let (status, message) = call(&p, &tok).await.unwrap_err();
            assert_eq!(status, 401);
            assert!(message.contains(reason), "{message} should mention {reason}");
        }
        // Without the setting, a day-long token is fine.
        let long = with(&[("iat", t.into()), ("exp", (t + 86_400).into())]);
        call(&plugin(), &long).await.expect("no maximum lifetime by default");

        let zero = serde_json::json!({"hs256_secret": SECRET, "max_lifetime_secs": 0});
        assert_eq!(
            JwtAuth::new(settings_from(&zero).unwrap(), None).err().unwrap()[0].path,
            "max_lifetime_secs"
        );
    }

    #[test]
    fn unset_issuer_and_audience_are_warned_about() {
        let paths =
            |settings: serde_json::Value| -> Vec<String> { warnings(&settings).into_iter().map(|i| i.path).collect() };
        assert_eq!(
            paths(serde_json::json!({"hs256_secret": SECRET})),
            ["issuer", "audience"]
        );
        assert_eq!(
            paths(serde_json::json!({"hs256_secret": SECRET, "issuer": "https://idp.example"})),
            ["audience"]
        );
        assert!(paths(serde_json::json!({"hs256_secret": SECRET, "issuer": "i", "audience": "a"})).is_empty());
        assert!(
            paths(serde_json::json!({"hs256_secret": 5})).is_empty(),
            "errors are not warnings"
        );
    }

    #[test]
    fn settings_need_exactly_one_key_source() {
        let none = JwtAuth::new(JwtAuthSettings::default(), None);
        assert!(none.is_err());
        let short = serde_json::json!({"hs256_secret": "short"});
        assert_eq!(
            JwtAuth::new(settings_from(&short).unwrap(), None).err().unwrap()[0].path,
            "hs256_secret"
        );
    }
}
