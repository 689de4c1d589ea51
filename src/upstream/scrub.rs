//! Masking secrets in what a provider sends back before a client (or a log) sees it.
//!
//! Providers quote credentials in error bodies: a 401 that echoes the key it refused, a 500 whose
//! debug text holds the `Authorization` header it received. The gateway's provider keys must
//! never reach a client, so every upstream error body (and every error event of a stream) passes
//! through [`Scrubber::scrub`], and so does its copy in the log. What is masked:
//! - the configured provider keys, wherever they appear;
//! - the token after `Bearer ` (any case);
//! - anything shaped like a provider API key: a known key prefix (`sk-`, `sk_`, `AIza`, `gsk_`,
//!   `xai-`, …) followed by at least 16 key characters;
//! - the string value of a JSON member whose name says it holds a credential (`api_key`,
//!   `authorization`, `token`, `secret`, `password`, …).
//!
//! Masking keeps the first four characters (`sk-p…`), so an operator can still tell which key
//! a provider complained about.

use bytes::Bytes;
use std::borrow::Cow;

/// What replaces the rest of a masked secret.
const MASK: &str = "…[redacted]";
/// Prefixes of API keys as providers issue them.
const KEY_PREFIXES: [&str; 9] = ["sk-", "sk_", "rk_", "pk_", "AIza", "gsk_", "xai-", "key-", "sess-"];
/// Key characters after a prefix before it counts as a key.
const MIN_KEY_TAIL: usize = 16;
/// Secrets shorter than this are not searched for (they would mask ordinary words).
const MIN_SECRET: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    secrets: Vec<String>,
}

fn key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

impl Scrubber {
    /// A scrubber that masks these exact secrets besides anything key-shaped.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Scrubber {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| s.len() >= MIN_SECRET)
            .map(str::to_owned)
            .collect();
        // Longest first, so a key that contains another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Scrubber { secrets }
    }

    /// This scrubber with one more exact secret (an account's own provider key, for the
    /// requests sent with it).
    pub fn with_secret(&self, secret: &str) -> Scrubber {
        Scrubber::new(self.secrets.iter().map(String::as_str).chain(std::iter::once(secret)))
    }

    /// `text` with every secret masked; borrowed back unchanged when there was nothing to mask.
    pub fn scrub<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut ranges = Vec::new();
        for secret in &self.secrets {
            ranges.extend(text.match_indices(secret.as_str()).map(|(i, s)| (i, i + s.len())));
        }
        find_bearer_tokens(text, &mut ranges);
        find_prefixed_keys(text, &mut ranges);
        find_credential_members(text, &mut ranges);
        if ranges.is_empty() {
            return Cow::Borrowed(text);
        }
        ranges.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end) in ranges {
            let end = end.max(start);
            if end <= at {
                continue;
            }
            let start = start.max(at);
            // Keep four characters of the secret for the operator, mask the rest.
            let keep = text[start..end].char_indices().nth(4).map_or(end, |(i, _)| start + i);
            out.push_str(&text[at..keep]);
            out.push_str(MASK);
            at = end;
        }
        out.push_str(&text[at..]);
        Cow::Owned(out)
    }

    /// [`Self::scrub`] for a body that may not be UTF-8 (read lossily): the same bytes, not
    /// copied, when there was nothing to mask.
    pub fn scrub_body(&self, body: Bytes) -> Bytes {
        match self.scrub(&String::from_utf8_lossy(&body)) {
            Cow::Borrowed(_) => body,
            Cow::Owned(masked) => Bytes::from(masked),
        }
    }
}

/// `Bearer <token>` (any case): the token.
fn find_bearer_tokens(text: &str, ranges: &mut Vec<(usize, usize)>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i + 7 <= bytes.len() {
        if bytes[i..i + 7].eq_ignore_ascii_case(b"bearer ") {
            let start = i + 7;
            let end = start
                + bytes[start..]
                    .iter()
                    .take_while(|&&b| !b.is_ascii_whitespace() && b != b'"' && b != b'\'' && b != b',')
                    .count();
            if end > start {
                ranges.push((start, end));
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
}

/// A known key prefix followed by enough key characters, not in the middle of a word.
fn find_prefixed_keys(text: &str, ranges: &mut Vec<(usize, usize)>) {
    let bytes = text.as_bytes();
    for prefix in KEY_PREFIXES {
        for (i, _) in text.match_indices(prefix) {
            if i > 0 && key_char(bytes[i - 1]) {
                continue;
            }
            let tail = bytes[i + prefix.len()..].iter().take_while(|&&b| key_char(b)).count();
            if tail >= MIN_KEY_TAIL {
                ranges.push((i, i + prefix.len() + tail));
            }
        }
    }
}

/// The string value of a JSON member whose name says it is a credential.
fn find_credential_members(text: &str, ranges: &mut Vec<(usize, usize)>) {
    const NAMES: [&str; 7] = [
        "key",
        "token",
        "secret",
        "password",
        "authorization",
        "credential",
        "cookie",
    ];
    let bytes = text.as_bytes();
    let mut search = 0;
    while let Some(q) = text[search..].find('"') {
        let name_start = search + q + 1;
        let Some(len) = text[name_start..].find('"') else {
            return;
        };
        let name_end = name_start + len;
        let name = &text[name_start..name_end];
        search = name_end + 1;
        if name.len() > 64 || !NAMES.iter().any(|n| name.to_ascii_lowercase().contains(n)) {
            continue;
        }
        // `"name" : "value"`: only a string value right after the colon.
        let mut j = name_end + 1;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        if bytes.get(j) != Some(&b':') {
            continue;
        }
        j += 1;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        if bytes.get(j) != Some(&b'"') {
            continue;
        }
        let value_start = j + 1;
        let mut k = value_start;
        while k < bytes.len() && bytes[k] != b'"' {
            k += if bytes[k] == b'\\' { 2 } else { 1 };
        }
        let value_end = k.min(bytes.len());
        if value_end > value_start {
            ranges.push((value_start, value_end));
        }
        search = value_end.saturating_add(1).min(text.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-provider-secret-abcdef";

    #[test]
    fn configured_keys_bearer_tokens_and_key_shapes_are_masked() {
        let s = Scrubber::new([KEY, "short"]);
        let body = format!(
            r#"{{"error":{{"message":"Incorrect API key provided: {KEY}. Header was Authorization: bearer abc.def-123","code":"invalid_api_key"}}}}"#
        );
        let out = s.scrub(&body);
        assert!(!out.contains(KEY), "{out}");
        assert!(!out.contains("abc.def-123"), "{out}");
        assert!(out.contains("sk-p…[redacted]"), "{out}");
        assert!(out.contains("invalid_api_key"), "the rest stays: {out}");
        serde_json::from_str::<serde_json::Value>(&out).expect("still JSON");

        let other = "key AIzaSyA1234567890abcdefghijklmnopqrstu and gsk_0123456789abcdefXYZ";
        let out = s.scrub(other);
        assert!(!out.contains("1234567890abcdefghij"), "{out}");
        assert!(!out.contains("0123456789abcdefXYZ"), "{out}");

        let member = r#"{"api_key" : "whatever-it-is", "api_key_hint": 5, "model": "gpt-4o"}"#;
        let out = s.scrub(member);
        assert!(!out.contains("whatever-it-is"), "{out}");
        assert!(out.contains(r#""model": "gpt-4o""#), "{out}");
    }

    #[test]
    fn ordinary_text_is_left_alone_without_a_copy() {
        let s = Scrubber::new([KEY]);
        let text = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM). Please try again in 2s. Visit https://platform.openai.com/account/rate-limits (request req_0123456789abcdef0123456789abcdef). task-specific risk","type":"tokens"}}"#;
        assert!(matches!(s.scrub(text), Cow::Borrowed(_)));
    }
}
