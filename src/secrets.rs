//! Sealing provider keys that accounts bring (BYOK): AES-256-GCM with a master key from the
//! environment, never written anywhere.
//!
//! `KOMILION_MASTER_KEYS="v2:<base64 32 bytes>,v1:<base64 32 bytes>"`: the first key seals, any
//! listed key opens (by the version stored with each secret). Rotation: put the new key first,
//! keep the old one listed, run `komilion admin reseal-provider-keys` (re-seals every secret with
//! the first key), then drop the old key. `KOMILION_MASTER_KEY=<base64>` alone means version `v1`.
//!
//! The account and provider are bound to each ciphertext as associated data, so a sealed secret
//! copied to another row does not open.

use crate::store::SealedSecret;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error("master key `{0}` must be 32 bytes of base64")]
    BadKey(String),
    #[error("master keys must look like `v2:<base64>,v1:<base64>`")]
    BadSpec,
    #[error("no master key `{0}` is configured to open this secret")]
    UnknownVersion(String),
    #[error("the secret does not open with its master key (tampered, or bound to another row)")]
    Corrupt,
}

pub struct MasterKeys {
    /// (version, cipher), the sealing key first.
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions: Vec<_> = self.keys.iter().map(|(v, _)| v.as_str()).collect();
        write!(f, "MasterKeys({versions:?})")
    }
}

impl MasterKeys {
    /// From `KOMILION_MASTER_KEYS` or `KOMILION_MASTER_KEY`; `None` when neither is set.
    pub fn from_env() -> Result<Option<MasterKeys>, SecretsError> {
        if let Ok(spec) = std::env::var("KOMILION_MASTER_KEYS") {
            return MasterKeys::parse(&spec).map(Some);
        }
        match std::env::var("KOMILION_MASTER_KEY") {
            Ok(key) => MasterKeys::parse(&format!("v1:{key}")).map(Some),
            Err(_) => Ok(None),
        }
    }

    pub fn parse(spec: &str) -> Result<MasterKeys, SecretsError> {
        let mut keys = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (version, b64) = part.split_once(':').ok_or(SecretsError::BadSpec)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| SecretsError::BadKey(version.to_owned()))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| SecretsError::BadKey(version.to_owned()))?;
            keys.push((version.trim().to_owned(), cipher));
        }
        if keys.is_empty() {
            return Err(SecretsError::BadSpec);
        }
        Ok(MasterKeys { keys })
    }

    pub fn current_version(&self) -> &str {
        &self.keys[0].0
    }

    /// Seal `plaintext` with the current key, bound to `(account_id, provider)`.
    pub fn seal(&self, plaintext: &[u8], account_id: &str, provider: &str) -> SealedSecret {
        let (version, cipher) = &self.keys[0];
        let nonce: [u8; 12] = rand::random();
        let aad = associated_data(account_id, provider);
        // Encryption with a valid key and a 12-byte nonce cannot fail.
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        SealedSecret {
            key_version: version.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    pub fn open(&self, sealed: &SealedSecret, account_id: &str, provider: &str) -> Result<Vec<u8>, SecretsError> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(v, _)| *v == sealed.key_version)
            .ok_or_else(|| SecretsError::UnknownVersion(sealed.key_version.clone()))?;
        if sealed.nonce.len() != 12 {
            return Err(SecretsError::Corrupt);
        }
        let aad = associated_data(account_id, provider);
        cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretsError::Corrupt)
    }
}

fn associated_data(account_id: &str, provider: &str) -> Vec<u8> {
    format!("komilion-provider-key\0{account_id}\0{provider}").into_bytes()
}

/// A new random master key, base64 (for `komilion admin new-master-key`).
pub fn generate_master_key() -> String {
    let key: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_rotates() {
        let old = MasterKeys::parse(&format!("v1:{}", generate_master_key())).unwrap();
        let sealed = old.seal(b"sk-provider-secret", "acct_1", "openai");
        assert_eq!(sealed.key_version, "v1");
        assert!(!sealed.ciphertext.windows(6).any(|w| w == b"secret"));
        assert_eq!(old.open(&sealed, "acct_1", "openai").unwrap(), b"sk-provider-secret");
        assert_eq!(
            old.open(&sealed, "acct_2", "openai"),
            Err(SecretsError::Corrupt),
            "bound to its row"
        );

        let v1 = format!("v1:{}", std::env::var("UNUSED").unwrap_or_default());
        assert!(MasterKeys::parse(&v1).is_err());
        let spec = format!("v2:{},{}", generate_master_key(), "v1:AAAA");
        assert!(MasterKeys::parse(&spec).is_err(), "short keys are refused");

        // Rotation: the new key seals, the old one still opens until resealed.
        let old_b64 = generate_master_key();
        let old = MasterKeys::parse(&format!("v1:{old_b64}")).unwrap();
        let sealed = old.seal(b"k", "a", "p");
        let both = MasterKeys::parse(&format!("v2:{},v1:{old_b64}", generate_master_key())).unwrap();
        assert_eq!(both.current_version(), "v2");
        assert_eq!(both.open(&sealed, "a", "p").unwrap(), b"k");
        let resealed = both.seal(&both.open(&sealed, "a", "p").unwrap(), "a", "p");
        assert_eq!(resealed.key_version, "v2");
        let new_only = MasterKeys::parse(&format!("v2:{}", generate_master_key())).unwrap();
        assert_eq!(
            new_only.open(&sealed, "a", "p"),
            Err(SecretsError::UnknownVersion("v1".into()))
        );
    }
}
