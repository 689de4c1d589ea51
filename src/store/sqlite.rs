//! The embedded store: one SQLite file, zero set-up, for a single gateway instance.
//!
//! One connection in WAL mode behind a mutex; every operation runs on tokio's blocking pool.
//! Changes are announced to this process's subscribers directly (no other instance shares the
//! file; a `komilion admin` command run beside the gateway is seen when caches expire).

use super::migrate::SQLITE;
use super::*;
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::sync::Mutex;

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    events: broadcast::Sender<StoreEvent>,
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn sql_error(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DatabaseBusy => {
            StoreError::Unavailable(e.to_string())
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Conflict(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn account_from(row: &Row<'_>) -> rusqlite::Result<(String, String, Option<String>, String, i64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn to_account(raw: (String, String, Option<String>, String, i64)) -> StoreResult<Account> {
    let (id, name, email, status, created) = raw;
    Ok(Account {
        id,
        name,
        email,
        status: AccountStatus::parse(&status)?,
        created_at: time(created),
    })
}

const ACCOUNT_COLUMNS: &str = "id, name, email, status, created_at";
const KEY_COLUMNS: &str = "k.id, k.account_id, k.name, k.prefix, k.created_at, k.last_used_at, k.expires_at, \
     k.revoked_at, k.allowed_models, k.rpm_limit, k.tpm_limit";

fn key_from(row: &Row<'_>) -> rusqlite::Result<KeyInfo> {
    let models: String = row.get(8)?;
    Ok(KeyInfo {
        id: row.get(0)?,
        account_id: row.get(1)?,
        name: row.get(2)?,
        prefix: row.get(3)?,
        created_at: time(row.get(4)?),
        last_used_at: row.get::<_, Option<i64>>(5)?.map(time),
        expires_at: row.get::<_, Option<i64>>(6)?.map(time),
        revoked_at: row.get::<_, Option<i64>>(7)?.map(time),
        allowed_models: serde_json::from_str(&models).unwrap_or_default(),
        rpm_limit: row.get(9)?,
        tpm_limit: row.get(10)?,
    })
}

fn get_account(conn: &Connection, id: &str) -> StoreResult<Account> {
    let raw = conn
        .query_row(
            &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"),
            [id],
            account_from,
        )
        .optional()
        .map_err(sql_error)?
        .ok_or(StoreError::NotFound("account"))?;
    to_account(raw)
}

fn get_wallet(conn: &Connection, account_id: &str) -> StoreResult<Wallet> {
    get_account(conn, account_id)?;
    let row = conn
        .query_row(
            "SELECT balance_nano_usd, updated_at FROM wallets WHERE account_id = ?1",
            [account_id],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()
        .map_err(sql_error)?;
    let (balance, updated) = row.unwrap_or((0, 0));
    Ok(Wallet {
        account_id: account_id.to_owned(),
        balance_nano_usd: balance,
        updated_at: time(updated),
    })
}

impl SqliteStore {
    /// Open (creating if needed) the database file and apply pending migrations.
    pub async fn open(path: &str) -> StoreResult<SqliteStore> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || -> StoreResult<Connection> {
            if let Some(dir) = std::path::Path::new(&path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
            }
            let mut conn = Connection::open(&path).map_err(|e| StoreError::Unavailable(format!("{path}: {e}")))?;
            conn.pragma_update(None, "journal_mode", "WAL").map_err(sql_error)?;
            conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql_error)?;
            conn.pragma_update(None, "foreign_keys", "ON").map_err(sql_error)?;
            conn.busy_timeout(OPERATION_TIMEOUT).map_err(sql_error)?;
            migrate(&mut conn)?;
            Ok(conn)
        })
        .await
        .map_err(internal)??;
        let (events, _) = broadcast::channel(1024);
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            events,
        })
    }

    /// Run `f` with the connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = self.conn.clone();
        bounded(async move {
            tokio::task::spawn_blocking(move || {
                let mut guard = conn
                    .lock()
                    .map_err(|_| StoreError::Internal("store mutex poisoned".into()))?;
                f(&mut guard)
            })
            .await
            .map_err(internal)?
        })
        .await
    }

    fn announce(&self, event: StoreEvent) {
        let _ = self.events.send(event);
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .map_err(sql_error)?;
    for m in SQLITE {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_error)?;
        let done: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [m.version],
                |r| r.get(0),
            )
            .map_err(sql_error)?;
        if !done {
            tx.execute_batch(m.sql)
                .map_err(|e| StoreError::Internal(format!("migration {}: {e}", m.version)))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                params![m.version, m.name, ms(Utc::now())],
            )
            .map_err(sql_error)?;
        }
        tx.commit().map_err(sql_error)?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create_account(&self, name: &str, email: &str) -> StoreResult<Account> {
        let account = Account {
            id: new_id("acct"),
            name: name.to_owned(),
            email: Some(email.to_owned()),
            status: AccountStatus::Active,
            created_at: time(ms(Utc::now())),
        };
        let a = account.clone();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(sql_error)?;
            let taken: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM accounts WHERE lower(email) = lower(?1))",
                    [&a.email],
                    |r| r.get(0),
                )
                .map_err(sql_error)?;
            if taken {
                return Err(StoreError::Conflict("an account with this email already exists".into()));
            }
            tx.execute(
                "INSERT INTO accounts (id, name, email, status, created_at) VALUES (?1, ?2, ?3, 'active', ?4)",
                params![a.id, a.name, a.email, ms(a.created_at)],
            )
            .map_err(sql_error)?;
            tx.execute(
                "INSERT INTO wallets (account_id, balance_nano_usd, updated_at) VALUES (?1, 0, ?2)",
                params![a.id, ms(a.created_at)],
            )
            .map_err(sql_error)?;
            tx.commit().map_err(sql_error)
        })
        .await?;
        Ok(account)
    }

    async fn get_account(&self, id: &str) -> StoreResult<Account> {
        let id = id.to_owned();
        self.with(move |conn| get_account(conn, &id)).await
    }

    async fn list_accounts(&self, limit: u32, after: Option<&str>) -> StoreResult<Vec<Account>> {
        let after = after.unwrap_or("").to_owned();
        self.with(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .map_err(sql_error)?;
            let rows = stmt.query_map(params![after, limit], account_from).map_err(sql_error)?;
            rows.map(|r| r.map_err(sql_error).and_then(to_account)).collect()
        })
        .await
    }

    async fn set_account_status(&self, id: &str, status: AccountStatus) -> StoreResult<Account> {
        let id = id.to_owned();
        let account = self
            .with(move |conn| {
                let n = conn
                    .execute(
                        "UPDATE accounts SET status = ?2 WHERE id = ?1",
                        params![id, status.as_str()],
                    )
                    .map_err(sql_error)?;
                if n == 0 {
                    return Err(StoreError::NotFound("account"));
                }
                get_account(conn, &id)
            })
            .await?;
        self.announce(StoreEvent::Account(account.id.clone()));
        Ok(account)
    }

    async fn create_key(
        &self,
        account_id: &str,
        name: &str,
        digest: [u8; 32],
        prefix: &str,
        limits: &KeyLimits,
    ) -> StoreResult<KeyInfo> {
        let key = KeyInfo {
            id: new_id("key"),
            account_id: account_id.to_owned(),
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            created_at: time(ms(Utc::now())),
            last_used_at: None,
            expires_at: limits.expires_at,
            revoked_at: None,
            allowed_models: limits.allowed_models.clone(),
            rpm_limit: limits.rpm_limit,
            tpm_limit: limits.tpm_limit,
        };
        let k = key.clone();
        self.with(move |conn| {
            let account = get_account(conn, &k.account_id)?;
            if account.status != AccountStatus::Active {
                return Err(StoreError::Invalid(format!("the account is {}", account.status.as_str())));
            }
            conn.execute(
                "INSERT INTO api_keys (id, account_id, name, prefix, digest, created_at, expires_at, allowed_models, rpm_limit, tpm_limit)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    k.id,
                    k.account_id,
                    k.name,
                    k.prefix,
                    &digest[..],
                    ms(k.created_at),
                    k.expires_at.map(ms),
                    serde_json::to_string(&k.allowed_models).unwrap_or_else(|_| "[]".into()),
                    k.rpm_limit,
                    k.tpm_limit
                ],
            )
            .map_err(sql_error)?;
            Ok(())
        })
        .await?;
        self.announce(StoreEvent::Key(digest));
        Ok(key)
    }

    async fn list_keys(&self, account_id: &str) -> StoreResult<Vec<KeyInfo>> {
        let account_id = account_id.to_owned();
        self.with(move |conn| {
            get_account(conn, &account_id)?;
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.account_id = ?1 ORDER BY k.created_at, k.id"
                ))
                .map_err(sql_error)?;
            let rows = stmt.query_map([&account_id], key_from).map_err(sql_error)?;
            rows.map(|r| r.map_err(sql_error)).collect()
        })
        .await
    }

    async fn revoke_key(&self, key_id: &str) -> StoreResult<()> {
        let key_id = key_id.to_owned();
        let digest = self
            .with(move |conn| {
                let digest: Option<Vec<u8>> = conn
                    .query_row("SELECT digest FROM api_keys WHERE id = ?1", [&key_id], |r| r.get(0))
                    .optional()
                    .map_err(sql_error)?;
                let digest = digest.ok_or(StoreError::NotFound("key"))?;
                conn.execute(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                    params![key_id, ms(Utc::now())],
                )
                .map_err(sql_error)?;
                Ok(digest)
            })
            .await?;
        if let Ok(digest) = <[u8; 32]>::try_from(digest.as_slice()) {
            self.announce(StoreEvent::Key(digest));
        }
        Ok(())
    }

    async fn find_key(&self, digest: [u8; 32]) -> StoreResult<Option<KeyRecord>> {
        self.with(move |conn| {
            conn.query_row(
                &format!("SELECT {KEY_COLUMNS}, a.status FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.digest = ?1"),
                [&digest[..]],
                |row| Ok((key_from(row)?, row.get::<_, String>(11)?)),
            )
            .optional()
            .map_err(sql_error)?
            .map(|(key, status)| Ok(KeyRecord { key, account_status: AccountStatus::parse(&status)? }))
            .transpose()
        })
        .await
    }

    async fn touch_keys(&self, key_ids: &[String], at: DateTime<Utc>) -> StoreResult<()> {
        let key_ids = key_ids.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(sql_error)?;
            for id in &key_ids {
                tx.execute(
                    "UPDATE api_keys SET last_used_at = max(COALESCE(last_used_at, 0), ?2) WHERE id = ?1",
                    params![id, ms(at)],
                )
                .map_err(sql_error)?;
            }
            tx.commit().map_err(sql_error)
        })
        .await
    }

    async fn wallet(&self, account_id: &str) -> StoreResult<Wallet> {
        let account_id = account_id.to_owned();
        self.with(move |conn| get_wallet(conn, &account_id)).await
    }

    async fn credit(&self, account_id: &str, amount: i64, kind: &str, reference: &str) -> StoreResult<(Wallet, bool)> {
        if amount <= 0 {
            return Err(StoreError::Invalid("a credit must be positive".into()));
        }
        let (account_id, kind, reference) = (account_id.to_owned(), kind.to_owned(), reference.to_owned());
        let result = self
            .with(move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql_error)?;
                get_account(&tx, &account_id)?;
                let now = ms(Utc::now());
                let inserted = tx
                    .execute(
                        "INSERT INTO wallet_credits (kind, reference, account_id, amount_nano_usd, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (kind, reference) DO NOTHING",
                        params![kind, reference, account_id, amount, now],
                    )
                    .map_err(sql_error)?
                    == 1;
                if inserted {
                    tx.execute(
                        "INSERT INTO wallets (account_id, balance_nano_usd, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (account_id) DO UPDATE SET balance_nano_usd = balance_nano_usd + excluded.balance_nano_usd,
                         updated_at = excluded.updated_at",
                        params![account_id, amount, now],
                    )
                    .map_err(sql_error)?;
                }
                let wallet = get_wallet(&tx, &account_id)?;
                tx.commit().map_err(sql_error)?;
                Ok((wallet, inserted))
            })
            .await?;
        if result.1 {
            self.announce(StoreEvent::Wallet(result.0.account_id.clone()));
        }
        Ok(result)
    }

    async fn put_provider_key(&self, account_id: &str, provider: &str, secret: &SealedSecret) -> StoreResult<()> {
        let (account_id, provider, secret) = (account_id.to_owned(), provider.to_owned(), secret.clone());
        self.with(move |conn| {
            get_account(conn, &account_id)?;
            conn.execute(
                "INSERT INTO provider_keys (account_id, provider, key_version, nonce, ciphertext, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (account_id, provider) DO UPDATE SET key_version = excluded.key_version,
                 nonce = excluded.nonce, ciphertext = excluded.ciphertext, created_at = excluded.created_at",
                params![
                    account_id,
                    provider,
                    secret.key_version,
                    secret.nonce,
                    secret.ciphertext,
                    ms(Utc::now())
                ],
            )
            .map_err(sql_error)?;
            Ok(())
        })
        .await
    }

    async fn get_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<Option<SealedSecret>> {
        let (account_id, provider) = (account_id.to_owned(), provider.to_owned());
        self.with(move |conn| {
            conn.query_row(
                "SELECT key_version, nonce, ciphertext FROM provider_keys WHERE account_id = ?1 AND provider = ?2",
                params![account_id, provider],
                |r| {
                    Ok(SealedSecret {
                        key_version: r.get(0)?,
                        nonce: r.get(1)?,
                        ciphertext: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(sql_error)
        })
        .await
    }

    async fn list_provider_keys(&self, account_id: &str) -> StoreResult<Vec<ProviderKeyInfo>> {
        let account_id = account_id.to_owned();
        self.with(move |conn| {
            get_account(conn, &account_id)?;
            let mut stmt = conn
                .prepare("SELECT provider, key_version, created_at FROM provider_keys WHERE account_id = ?1 ORDER BY provider")
                .map_err(sql_error)?;
            let rows = stmt
                .query_map([&account_id], |r| {
                    Ok(ProviderKeyInfo { provider: r.get(0)?, key_version: r.get(1)?, created_at: time(r.get(2)?) })
                })
                .map_err(sql_error)?;
            rows.map(|r| r.map_err(sql_error)).collect()
        })
        .await
    }

    async fn delete_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<()> {
        let (account_id, provider) = (account_id.to_owned(), provider.to_owned());
        self.with(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM provider_keys WHERE account_id = ?1 AND provider = ?2",
                    params![account_id, provider],
                )
                .map_err(sql_error)?;
            if n == 0 {
                return Err(StoreError::NotFound("provider key"));
            }
            Ok(())
        })
        .await
    }

    async fn all_provider_keys(&self) -> StoreResult<Vec<(String, String, SealedSecret)>> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare("SELECT account_id, provider, key_version, nonce, ciphertext FROM provider_keys ORDER BY account_id, provider")
                .map_err(sql_error)?;
            let rows = stmt
                .query_map([], |r| {
                    let sealed = SealedSecret { key_version: r.get(2)?, nonce: r.get(3)?, ciphertext: r.get(4)? };
                    Ok((r.get(0)?, r.get(1)?, sealed))
                })
                .map_err(sql_error)?;
            rows.map(|r| r.map_err(sql_error)).collect()
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}
