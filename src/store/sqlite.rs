//! The embedded store: one SQLite file, zero set-up, for a single gateway instance.
//!
//! One connection in WAL mode behind a mutex; every operation runs on tokio's blocking pool.
//! Changes are announced to this process's subscribers directly (no other instance shares the
//! file; a `komilion admin` command run beside the gateway is seen when caches expire).

use super::migrate::SQLITE;
use super::*;
use crate::usage::UsageRecord;
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::collections::HashMap;
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
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::TooBig => {
            StoreError::Rejected(e.to_string())
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
     k.revoked_at, k.allowed_models, k.rpm_limit, k.tpm_limit, k.budget_nano_usd, k.spent_nano_usd";
const USAGE_COLUMNS: &str = "request_id, account_id, key_id, created_at, route, requested_model, routed_model, \
     provider, task, status, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_nano_usd, \
     unbilled_nano_usd, estimated, latency_ms, ttfb_ms, cache_hit, lease_id, end_user";

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
        budget_nano_usd: row.get(11)?,
        spent_nano_usd: row.get(12)?,
    })
}

fn usage_from(row: &Row<'_>) -> rusqlite::Result<UsageRecord> {
    Ok(UsageRecord {
        request_id: row.get(0)?,
        account_id: row.get(1)?,
        key_id: row.get(2)?,
        created_at: time(row.get(3)?),
        route: row.get(4)?,
        requested_model: row.get(5)?,
        routed_model: row.get(6)?,
        provider: row.get(7)?,
        task: row.get(8)?,
        status: row.get(9)?,
        input_tokens: row.get::<_, i64>(10)? as u64,
        output_tokens: row.get::<_, i64>(11)? as u64,
        cached_tokens: row.get::<_, i64>(12)? as u64,
        reasoning_tokens: row.get::<_, i64>(13)? as u64,
        cost_nano_usd: row.get(14)?,
        unbilled_nano_usd: row.get(15)?,
        estimated: row.get(16)?,
        latency_ms: row.get::<_, i64>(17)? as u64,
        ttfb_ms: row.get::<_, Option<i64>>(18)?.map(|v| v as u64),
        cache_hit: row.get(19)?,
        lease_id: row.get(20)?,
        end_user: row.get(21)?,
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
            "SELECT w.balance_nano_usd, w.updated_at, w.credited_nano_usd, w.spent_nano_usd,
                    COALESCE((SELECT sum(l.granted_nano_usd - COALESCE((SELECT sum(u.cost_nano_usd - u.unbilled_nano_usd)
                                                                        FROM usage_records u WHERE u.lease_id = l.id), 0))
                              FROM wallet_leases l WHERE l.account_id = w.account_id AND l.settled_at IS NULL), 0)
             FROM wallets w WHERE w.account_id = ?1",
            [account_id],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?)),
        )
        .optional()
        .map_err(sql_error)?;
    let (balance, updated, credited, spent, leased) = row.unwrap_or((0, 0, 0, 0, 0));
    Ok(Wallet {
        account_id: account_id.to_owned(),
        balance_nano_usd: balance + leased.max(0),
        leased_nano_usd: leased.max(0),
        credited_nano_usd: credited,
        spent_nano_usd: spent,
        updated_at: time(updated),
    })
}

fn now_ms() -> i64 {
    ms(Utc::now())
}

fn ttl_ms(ttl: Duration) -> i64 {
    ttl.as_millis().min(i64::MAX as u128) as i64
}

// Statements `insert_usage` runs once per batch or per distinct lease, account and key: cached
// (prepared once per connection) like its insert.
const LEASE_WAS_RECLAIMED: &str =
    "SELECT EXISTS (SELECT 1 FROM wallet_leases WHERE id = ?1 AND settled_by = 'reclaim')";
const WALLET_BALANCE: &str = "SELECT balance_nano_usd FROM wallets WHERE account_id = ?1";
const ADD_WALLET_SPENT: &str = "UPDATE wallets SET spent_nano_usd = spent_nano_usd + ?2 WHERE account_id = ?1 \
                                RETURNING credited_nano_usd, spent_nano_usd";
const ADD_KEY_SPENT: &str = "UPDATE api_keys SET spent_nano_usd = spent_nano_usd + ?2 WHERE id = ?1 \
                             RETURNING spent_nano_usd, budget_nano_usd";

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
            budget_nano_usd: limits.budget_nano_usd,
            spent_nano_usd: 0,
        };
        let k = key.clone();
        self.with(move |conn| {
            let account = get_account(conn, &k.account_id)?;
            if account.status != AccountStatus::Active {
                return Err(StoreError::Invalid(format!("the account is {}", account.status.as_str())));
            }
            conn.execute(
                "INSERT INTO api_keys (id, account_id, name, prefix, digest, created_at, expires_at, allowed_models, rpm_limit, tpm_limit, budget_nano_usd)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
                    k.tpm_limit,
                    k.budget_nano_usd
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
                |row| Ok((key_from(row)?, row.get::<_, String>(13)?)),
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
                        "INSERT INTO wallets (account_id, balance_nano_usd, credited_nano_usd, updated_at) VALUES (?1, ?2, ?2, ?3)
                         ON CONFLICT (account_id) DO UPDATE SET balance_nano_usd = balance_nano_usd + excluded.balance_nano_usd,
                         credited_nano_usd = credited_nano_usd + excluded.credited_nano_usd, updated_at = excluded.updated_at",
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

    async fn keep_unmatched_payment(&self, p: &UnmatchedPayment) -> StoreResult<bool> {
        let p = p.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO stripe_unmatched (event_id, event_type, account_ref, amount_nano_usd, reason, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (event_id) DO NOTHING",
                params![
                    p.event_id,
                    p.event_type,
                    p.account_ref,
                    p.amount_nano_usd,
                    p.reason,
                    ms(p.received_at)
                ],
            )
            .map(|n| n == 1)
            .map_err(sql_error)
        })
        .await
    }

    async fn unmatched_payments(&self, limit: u32) -> StoreResult<Vec<UnmatchedPayment>> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT event_id, event_type, account_ref, amount_nano_usd, reason, received_at
                     FROM stripe_unmatched ORDER BY received_at DESC, event_id LIMIT ?1",
                )
                .map_err(sql_error)?;
            let rows = stmt
                .query_map(params![limit], |r| {
                    Ok(UnmatchedPayment {
                        event_id: r.get(0)?,
                        event_type: r.get(1)?,
                        account_ref: r.get(2)?,
                        amount_nano_usd: r.get(3)?,
                        reason: r.get(4)?,
                        received_at: time(r.get(5)?),
                    })
                })
                .map_err(sql_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql_error)
        })
        .await
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

    async fn lease(
        &self,
        account_id: &str,
        instance_id: &str,
        lease_id: Option<&str>,
        min: i64,
        want: i64,
        ttl: Duration,
    ) -> StoreResult<LeaseGrant> {
        let (account_id, instance_id, lease_id) = (
            account_id.to_owned(),
            instance_id.to_owned(),
            lease_id.map(str::to_owned),
        );
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql_error)?;
            let account = get_account(&tx, &account_id)?;
            if account.status != AccountStatus::Active {
                return Err(StoreError::Invalid(format!("the account is {}", account.status.as_str())));
            }
            let balance: i64 = tx
                .query_row("SELECT balance_nano_usd FROM wallets WHERE account_id = ?1", [&account_id], |r| r.get(0))
                .optional()
                .map_err(sql_error)?
                .unwrap_or(0);
            let grant = lease_grant(balance, min, want);
            let now = now_ms();
            let expires = now + ttl_ms(ttl);
            let mut id = lease_id.unwrap_or_default();
            let grown = !id.is_empty()
                && tx
                    .execute(
                        "UPDATE wallet_leases SET granted_nano_usd = granted_nano_usd + ?2, expires_at = ?3
                         WHERE id = ?1 AND settled_at IS NULL",
                        params![id, grant, expires],
                    )
                    .map_err(sql_error)?
                    == 1;
            if !grown {
                id = String::new();
                if grant > 0 {
                    id = new_id("lease");
                    tx.execute(
                        "INSERT INTO wallet_leases (id, account_id, instance_id, granted_nano_usd, created_at, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![id, account_id, instance_id, grant, now, expires],
                    )
                    .map_err(sql_error)?;
                }
            }
            if grant > 0 {
                tx.execute(
                    "UPDATE wallets SET balance_nano_usd = balance_nano_usd - ?2, updated_at = ?3 WHERE account_id = ?1",
                    params![account_id, grant, now],
                )
                .map_err(sql_error)?;
            }
            tx.commit().map_err(sql_error)?;
            Ok(LeaseGrant { lease_id: id, granted_nano_usd: grant, balance_nano_usd: balance - grant })
        })
        .await
    }

    async fn extend_lease(&self, lease_id: &str, ttl: Duration) -> StoreResult<()> {
        let lease_id = lease_id.to_owned();
        self.with(move |conn| {
            conn.execute(
                "UPDATE wallet_leases SET expires_at = ?2 WHERE id = ?1 AND settled_at IS NULL",
                params![lease_id, now_ms() + ttl_ms(ttl)],
            )
            .map_err(sql_error)?;
            Ok(())
        })
        .await
    }

    async fn settle_lease(&self, lease_id: &str, spent: i64) -> StoreResult<Option<i64>> {
        let lease_id = lease_id.to_owned();
        let result = self
            .with(move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql_error)?;
                let row: Option<(String, i64, Option<i64>)> = tx
                    .query_row(
                        "SELECT account_id, granted_nano_usd, settled_at FROM wallet_leases WHERE id = ?1",
                        [&lease_id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(sql_error)?;
                let (account_id, granted, settled) = row.ok_or(StoreError::NotFound("lease"))?;
                if settled.is_some() {
                    return Ok(None);
                }
                let spent = spent.clamp(0, granted);
                let returned = granted - spent;
                let now = now_ms();
                tx.execute(
                    "UPDATE wallet_leases SET settled_at = ?2, spent_nano_usd = ?3, settled_by = 'owner' WHERE id = ?1",
                    params![lease_id, now, spent],
                )
                .map_err(sql_error)?;
                tx.execute(
                    "UPDATE wallets SET balance_nano_usd = balance_nano_usd + ?2, updated_at = ?3 WHERE account_id = ?1",
                    params![account_id, returned, now],
                )
                .map_err(sql_error)?;
                tx.commit().map_err(sql_error)?;
                Ok(Some((account_id, returned)))
            })
            .await?;
        Ok(result.map(|(account_id, returned)| {
            if returned > 0 {
                self.announce(StoreEvent::Wallet(account_id));
            }
            returned
        }))
    }

    async fn reclaim_expired_leases(&self, grace: Duration) -> StoreResult<u64> {
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql_error)?;
            let now = now_ms();
            let expired: Vec<(String, String, i64)> = {
                let mut stmt = tx
                    .prepare("SELECT id, account_id, granted_nano_usd FROM wallet_leases WHERE settled_at IS NULL AND expires_at < ?1")
                    .map_err(sql_error)?;
                let rows = stmt.query_map([now - ttl_ms(grace)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql_error)?;
                rows.collect::<Result<_, _>>().map_err(sql_error)?
            };
            for (id, account_id, granted) in &expired {
                let spent: i64 = tx
                    .query_row(
                        "SELECT COALESCE(sum(cost_nano_usd - unbilled_nano_usd), 0) FROM usage_records WHERE lease_id = ?1",
                        [id],
                        |r| r.get(0),
                    )
                    .map_err(sql_error)?;
                let spent = spent.clamp(0, *granted);
                tx.execute(
                    "UPDATE wallet_leases SET settled_at = ?2, spent_nano_usd = ?3, settled_by = 'reclaim' WHERE id = ?1",
                    params![id, now, spent],
                )
                .map_err(sql_error)?;
                tx.execute(
                    "UPDATE wallets SET balance_nano_usd = balance_nano_usd + ?2, updated_at = ?3 WHERE account_id = ?1",
                    params![account_id, granted - spent, now],
                )
                .map_err(sql_error)?;
            }
            tx.commit().map_err(sql_error)?;
            Ok(expired.len() as u64)
        })
        .await
    }

    async fn insert_usage(&self, records: &[UsageRecord], rules: &AlertRules) -> StoreResult<u64> {
        let (records, rules) = (records.to_vec(), rules.clone());
        self.with(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql_error)?;
            let mut inserted = 0;
            let mut by_account: Vec<(String, i64)> = Vec::new();
            let mut by_key: Vec<(String, String, i64)> = Vec::new();
            // Which leases of this batch were reclaimed: one look per distinct lease.
            let mut reclaimed_leases: HashMap<String, bool> = HashMap::new();
            let insert_sql = format!(
                "INSERT OR IGNORE INTO usage_records ({USAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
            );
            for r in &records {
                let n = tx
                    .prepare_cached(&insert_sql)
                    .map_err(sql_error)?
                    .execute(
                        params![
                            r.request_id, r.account_id, r.key_id, ms(r.created_at), r.route, r.requested_model,
                            r.routed_model, r.provider, r.task, r.status, r.input_tokens as i64, r.output_tokens as i64,
                            r.cached_tokens as i64, r.reasoning_tokens as i64, r.cost_nano_usd, r.unbilled_nano_usd,
                            r.estimated, r.latency_ms as i64, r.ttfb_ms.map(|v| v as i64), r.cache_hit, r.lease_id,
                            r.end_user
                        ],
                    )
                    .map_err(sql_error)?;
                if n == 0 {
                    continue;
                }
                inserted += 1;
                let mut billed = r.cost_nano_usd - r.unbilled_nano_usd;
                // Usage of a lease reclaimed after its instance vanished was not in what the
                // reclaim kept: bill it now, as far as the wallet covers it.
                if let Some(lease) = &r.lease_id {
                    let reclaimed = match reclaimed_leases.get(lease) {
                        Some(known) => *known,
                        None => {
                            let found: bool = tx
                                .prepare_cached(LEASE_WAS_RECLAIMED)
                                .map_err(sql_error)?
                                .query_row([lease], |row| row.get(0))
                                .map_err(sql_error)?;
                            reclaimed_leases.insert(lease.clone(), found);
                            found
                        }
                    };
                    if reclaimed && billed > 0 {
                        let balance: i64 = tx
                            .prepare_cached(WALLET_BALANCE)
                            .map_err(sql_error)?
                            .query_row([&r.account_id], |row| row.get(0))
                            .optional()
                            .map_err(sql_error)?
                            .unwrap_or(0);
                        let debit = billed.min(balance.max(0));
                        tx.execute("UPDATE wallets SET balance_nano_usd = balance_nano_usd - ?2 WHERE account_id = ?1", params![r.account_id, debit])
                            .map_err(sql_error)?;
                        tx.execute(
                            "UPDATE usage_records SET unbilled_nano_usd = unbilled_nano_usd + ?2 WHERE request_id = ?1",
                            params![r.request_id, billed - debit],
                        )
                        .map_err(sql_error)?;
                        billed = debit;
                    }
                }
                match by_account.iter_mut().find(|(a, _)| *a == r.account_id) {
                    Some((_, sum)) => *sum += billed,
                    None => by_account.push((r.account_id.clone(), billed)),
                }
                if let Some(key) = &r.key_id {
                    match by_key.iter_mut().find(|(k, _, _)| k == key) {
                        Some((_, _, sum)) => *sum += billed,
                        None => by_key.push((key.clone(), r.account_id.clone(), billed)),
                    }
                }
            }
            let now = now_ms();
            for (account_id, delta) in by_account.into_iter().filter(|(_, d)| *d != 0) {
                let row: Option<(i64, i64)> = tx
                    .prepare_cached(ADD_WALLET_SPENT)
                    .map_err(sql_error)?
                    .query_row(params![account_id, delta], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(sql_error)?;
                if let Some((credited, spent)) = row {
                    let after = credited - spent;
                    if let Some(threshold) = crossed_below(after + delta, after, rules.wallet_below_nano_usd) {
                        tx.execute(
                            "INSERT INTO alert_outbox (payload, created_at, next_attempt_at) VALUES (?1, ?2, ?2)",
                            params![wallet_alert(&account_id, after, threshold), now],
                        )
                        .map_err(sql_error)?;
                    }
                }
            }
            for (key_id, account_id, delta) in by_key.into_iter().filter(|(_, _, d)| *d != 0) {
                let row: Option<(i64, Option<i64>)> = tx
                    .prepare_cached(ADD_KEY_SPENT)
                    .map_err(sql_error)?
                    .query_row(params![key_id, delta], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(sql_error)?;
                if let Some((spent, budget)) = row {
                    if let Some((budget, percent)) = crossed_share(spent - delta, spent, budget, rules.key_budget_percent) {
                        tx.execute(
                            "INSERT INTO alert_outbox (payload, created_at, next_attempt_at) VALUES (?1, ?2, ?2)",
                            params![key_alert(&account_id, &key_id, spent, budget, percent), now],
                        )
                        .map_err(sql_error)?;
                    }
                }
            }
            tx.commit().map_err(sql_error)?;
            Ok(inserted)
        })
        .await
        .map_err(super::usage_refused)
    }

    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> StoreResult<Vec<UsageRecord>> {
        let filter = filter.clone();
        self.with(move |conn| {
            let (after_ms, after_id) = after.map_or((i64::MIN, String::new()), |(t, id)| (ms(t), id));
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {USAGE_COLUMNS} FROM usage_records
                     WHERE account_id = ?1 AND (?2 IS NULL OR key_id = ?2) AND created_at >= ?3 AND created_at < ?4
                       AND (created_at, request_id) > (?5, ?6)
                     ORDER BY created_at, request_id LIMIT ?7"
                ))
                .map_err(sql_error)?;
            let rows = stmt
                .query_map(
                    params![
                        filter.account_id,
                        filter.key_id,
                        filter.from.map_or(i64::MIN, ms),
                        filter.to.map_or(i64::MAX, ms),
                        after_ms,
                        after_id,
                        limit
                    ],
                    usage_from,
                )
                .map_err(sql_error)?;
            rows.map(|r| r.map_err(sql_error)).collect()
        })
        .await
    }

    async fn purge_usage(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        self.with(move |conn| {
            let n = conn
                .execute("DELETE FROM usage_records WHERE created_at < ?1", [ms(before)])
                .map_err(sql_error)?;
            Ok(n as u64)
        })
        .await
    }

    async fn erase_account(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        let digests = self
            .with(move |conn| {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(sql_error)?;
                get_account(&tx, &id)?;
                let digests: Vec<Vec<u8>> = {
                    let mut stmt = tx
                        .prepare("SELECT digest FROM api_keys WHERE account_id = ?1")
                        .map_err(sql_error)?;
                    let rows = stmt.query_map([&id], |r| r.get(0)).map_err(sql_error)?;
                    rows.collect::<Result<_, _>>().map_err(sql_error)?
                };
                tx.execute(
                    "UPDATE accounts SET name = '', email = NULL, status = 'erased' WHERE id = ?1",
                    [&id],
                )
                .map_err(sql_error)?;
                tx.execute("DELETE FROM api_keys WHERE account_id = ?1", [&id])
                    .map_err(sql_error)?;
                tx.execute("DELETE FROM provider_keys WHERE account_id = ?1", [&id])
                    .map_err(sql_error)?;
                tx.execute("UPDATE usage_records SET key_id = NULL WHERE account_id = ?1", [&id])
                    .map_err(sql_error)?;
                tx.commit().map_err(sql_error)?;
                Ok((id, digests))
            })
            .await?;
        let (id, digests) = digests;
        for d in digests {
            if let Ok(d) = <[u8; 32]>::try_from(d.as_slice()) {
                self.announce(StoreEvent::Key(d));
            }
        }
        self.announce(StoreEvent::Account(id));
        Ok(())
    }

    async fn due_alerts(&self, limit: u32) -> StoreResult<Vec<PendingAlert>> {
        self.with(move |conn| {
            let now = now_ms();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql_error)?;
            let due: Vec<PendingAlert> = {
                let mut stmt = tx
                    .prepare("SELECT id, payload, attempts FROM alert_outbox WHERE next_attempt_at <= ?1 ORDER BY id LIMIT ?2")
                    .map_err(sql_error)?;
                let rows = stmt
                    .query_map(params![now, limit], |r| Ok(PendingAlert { id: r.get(0)?, payload: r.get(1)?, attempts: r.get(2)? }))
                    .map_err(sql_error)?;
                rows.collect::<Result<_, _>>().map_err(sql_error)?
            };
            // Claimed for a minute: a sender that dies leaves them to the next one.
            for a in &due {
                tx.execute("UPDATE alert_outbox SET next_attempt_at = ?2 WHERE id = ?1", params![a.id, now + 60_000])
                    .map_err(sql_error)?;
            }
            tx.commit().map_err(sql_error)?;
            Ok(due)
        })
        .await
    }

    async fn alert_delivered(&self, id: i64) -> StoreResult<()> {
        self.with(move |conn| {
            conn.execute("DELETE FROM alert_outbox WHERE id = ?1", [id])
                .map_err(sql_error)?;
            Ok(())
        })
        .await
    }

    async fn alert_failed(&self, id: i64, delay: Duration) -> StoreResult<()> {
        self.with(move |conn| {
            conn.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at = ?2 WHERE id = ?1",
                params![id, now_ms() + ttl_ms(delay)],
            )
            .map_err(sql_error)?;
            Ok(())
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}
