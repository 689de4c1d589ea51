//! The shared store: PostgreSQL through a deadpool of tokio-postgres connections.
//!
//! Several gateway instances share it. Changes (keys revoked, accounts disabled, wallets
//! credited) are announced with NOTIFY on the channel `komilion_<schema>` by triggers and by
//! the credit transaction, and every instance LISTENs on it: a revoked key stops working on all
//! of them within a second.
//!
//! All I/O runs on the runtime that opened the store (connections and the listener are tasks
//! there), whatever runtime calls in: Pingora gives each service its own runtime, and a
//! connection must not die with the runtime that happened to open it.

use super::migrate::POSTGRES;
use super::pg_tls::{self, MakeRustls};
use super::*;
use crate::usage::UsageRecord;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Row};

pub struct PgStore {
    pool: Pool,
    runtime: Handle,
    events: broadcast::Sender<StoreEvent>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        use tokio_postgres::error::SqlState;
        let code = db.code();
        if *code == SqlState::UNIQUE_VIOLATION
            || *code == SqlState::CHECK_VIOLATION
            || *code == SqlState::FOREIGN_KEY_VIOLATION
        {
            return StoreError::Conflict(db.message().to_owned());
        }
        // Class 22, data exception: a value the column cannot hold (a NUL in text, a number out
        // of range). The same data fails the same way every time.
        if code.code().starts_with("22") {
            return StoreError::Rejected(db.message().to_owned());
        }
        return StoreError::Internal(db.to_string());
    }
    // Not an error from the server: the connection is broken or was never made (unreachable,
    // TLS refused or the certificate not trusted: the causes say which).
    StoreError::Unavailable(error_chain(&e))
}

/// How long opening the store keeps trying to make its first connection.
const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

const ACCOUNT_COLUMNS: &str = "id, name, email, status, created_at";
const KEY_COLUMNS: &str = "k.id, k.account_id, k.name, k.prefix, k.created_at, k.last_used_at, k.expires_at, \
     k.revoked_at, k.allowed_models, k.rpm_limit, k.tpm_limit, k.budget_nano_usd, k.spent_nano_usd";
const USAGE_COLUMNS: &str = "request_id, account_id, key_id, created_at, route, requested_model, routed_model, \
     provider, task, status, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_nano_usd, \
     unbilled_nano_usd, estimated, latency_ms, ttfb_ms, cache_hit, lease_id, end_user";

fn account_from(row: &Row) -> StoreResult<Account> {
    Ok(Account {
        id: row.get(0),
        name: row.get(1),
        email: row.get(2),
        status: AccountStatus::parse(row.get(3))?,
        created_at: row.get(4),
    })
}

fn key_from(row: &Row) -> KeyInfo {
    KeyInfo {
        id: row.get(0),
        account_id: row.get(1),
        name: row.get(2),
        prefix: row.get(3),
        created_at: row.get(4),
        last_used_at: row.get(5),
        expires_at: row.get(6),
        revoked_at: row.get(7),
        allowed_models: row.get(8),
        rpm_limit: row.get::<_, Option<i32>>(9).map(|v| v as u32),
        tpm_limit: row.get::<_, Option<i32>>(10).map(|v| v as u32),
        budget_nano_usd: row.get(11),
        spent_nano_usd: row.get(12),
    }
}

fn usage_from(row: &Row) -> UsageRecord {
    UsageRecord {
        request_id: row.get(0),
        account_id: row.get(1),
        key_id: row.get(2),
        created_at: row.get(3),
        route: row.get(4),
        requested_model: row.get(5),
        routed_model: row.get(6),
        provider: row.get(7),
        task: row.get(8),
        status: row.get::<_, i32>(9) as u16,
        input_tokens: row.get::<_, i64>(10) as u64,
        output_tokens: row.get::<_, i64>(11) as u64,
        cached_tokens: row.get::<_, i64>(12) as u64,
        reasoning_tokens: row.get::<_, i64>(13) as u64,
        cost_nano_usd: row.get(14),
        unbilled_nano_usd: row.get(15),
        estimated: row.get(16),
        latency_ms: row.get::<_, i64>(17) as u64,
        ttfb_ms: row.get::<_, Option<i64>>(18).map(|v| v as u64),
        cache_hit: row.get(19),
        lease_id: row.get(20),
        end_user: row.get(21),
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

type Client = deadpool_postgres::Object;

async fn get_account(c: &impl deadpool_postgres::GenericClient, id: &str) -> StoreResult<Account> {
    let row = c
        .query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"), &[&id])
        .await
        .map_err(pg_error)?
        .ok_or(StoreError::NotFound("account"))?;
    account_from(&row)
}

async fn get_wallet(c: &impl deadpool_postgres::GenericClient, account_id: &str) -> StoreResult<Wallet> {
    get_account(c, account_id).await?;
    let row = c
        .query_opt(
            "SELECT w.balance_nano_usd, w.updated_at, w.credited_nano_usd, w.spent_nano_usd,
                    COALESCE((SELECT sum(l.granted_nano_usd - COALESCE((SELECT sum(u.cost_nano_usd - u.unbilled_nano_usd)
                                                                        FROM usage_records u WHERE u.lease_id = l.id), 0))
                              FROM wallet_leases l WHERE l.account_id = w.account_id AND l.settled_at IS NULL), 0)::BIGINT
             FROM wallets w WHERE w.account_id = $1",
            &[&account_id],
        )
        .await
        .map_err(pg_error)?;
    Ok(match row {
        Some(row) => {
            let leased: i64 = row.get::<_, i64>(4).max(0);
            Wallet {
                account_id: account_id.to_owned(),
                balance_nano_usd: row.get::<_, i64>(0) + leased,
                leased_nano_usd: leased,
                credited_nano_usd: row.get(2),
                spent_nano_usd: row.get(3),
                updated_at: row.get(1),
            }
        }
        None => Wallet {
            account_id: account_id.to_owned(),
            balance_nano_usd: 0,
            leased_nano_usd: 0,
            credited_nano_usd: 0,
            spent_nano_usd: 0,
            updated_at: DateTime::default(),
        },
    })
}

impl PgStore {
    /// Connect, apply pending migrations and start listening for changes. TLS as the URL's
    /// `sslmode` and `sslrootcert` say ([`pg_tls`]).
    pub async fn connect(url: &str) -> StoreResult<PgStore> {
        let (mut config, tls) = pg_tls::parse_url(url)?;
        let tls = tls.connector()?;
        config.connect_timeout(Duration::from_secs(2));
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name("komilion");
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(OPERATION_TIMEOUT))
            .create_timeout(Some(Duration::from_secs(2)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .build()
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        // The first connection is made at start-up, when a busy machine or a server that has
        // just started may take longer than a request could wait: slow attempts (the pool's
        // own create timeout) are retried up to a start-up bound; a refusal fails at once.
        let started = std::time::Instant::now();
        let client = loop {
            match pool.get().await {
                Ok(client) => break client,
                Err(deadpool_postgres::PoolError::Timeout(_)) if started.elapsed() < STARTUP_CONNECT_TIMEOUT => {}
                Err(e) => return Err(pool_error(e)),
            }
        };
        let schema: String = client
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        bounded_by(MIGRATION_TIMEOUT, migrate(client)).await?;
        let (events, _) = broadcast::channel(1024);
        let runtime = Handle::current();
        let listener = runtime.spawn(listen(config, tls, format!("komilion_{schema}"), events.clone()));
        Ok(PgStore {
            pool,
            runtime,
            events,
            listener,
        })
    }

    /// Tell this instance's subscribers at once; the NOTIFY (from triggers or the transaction)
    /// tells the other instances, and this one a second time, harmlessly.
    fn announce(&self, event: StoreEvent) {
        let _ = self.events.send(event);
    }

    /// Run one statement; the number of rows it touched.
    async fn exec(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>,
    ) -> StoreResult<u64> {
        self.with(move |c| {
            Box::pin(async move {
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                c.execute(sql, &refs).await.map_err(pg_error)
            })
        })
        .await
    }

    /// Run `f` with a pooled connection, on the store's runtime, within the time bound.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(Client) -> BoxFuture<'static, StoreResult<T>> + Send + 'static,
    ) -> StoreResult<T> {
        let pool = self.pool.clone();
        let task = self.runtime.spawn(async move {
            let client = pool.get().await.map_err(pool_error)?;
            f(client).await
        });
        bounded(async { task.await.map_err(|e| StoreError::Unavailable(e.to_string()))? }).await
    }
}

async fn migrate(mut client: Client) -> StoreResult<()> {
    let tx = client.transaction().await.map_err(pg_error)?;
    // One instance migrates at a time; the others wait here, then find nothing to do.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('komilion_migrations_' || current_schema()))",
        &[],
    )
    .await
    .map_err(pg_error)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .map_err(pg_error)?;
    for m in POSTGRES {
        let done: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)",
                &[&m.version],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if !done {
            tx.batch_execute(m.sql)
                .await
                .map_err(|e| StoreError::Internal(format!("migration {}: {e}", m.version)))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&m.version, &m.name],
            )
            .await
            .map_err(pg_error)?;
        }
    }
    tx.commit().await.map_err(pg_error)
}

/// LISTEN on `channel` forever, forwarding notifications; on a lost connection, reconnect and
/// announce a resync (notifications sent meanwhile are lost, so caches must be dropped).
async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustls,
    channel: String,
    events: broadcast::Sender<StoreEvent>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let pump = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = messages.next().await {
                        if let AsyncMessage::Notification(n) = message {
                            let _ = tx.send(n.payload().to_owned());
                        }
                    }
                });
                let quoted = format!("\"{}\"", channel.replace('"', "\"\""));
                if client.batch_execute(&format!("LISTEN {quoted}")).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    if !first {
                        let _ = events.send(StoreEvent::Resync);
                    }
                    first = false;
                    while let Some(payload) = rx.recv().await {
                        if let Some(event) = StoreEvent::decode(&payload) {
                            let _ = events.send(event);
                        }
                    }
                }
                pump.abort();
                tracing::warn!("store listener lost its connection; reconnecting");
            }
            Err(e) => tracing::warn!("store listener cannot connect: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create_account(&self, name: &str, email: &str) -> StoreResult<Account> {
        let (name, email) = (name.to_owned(), email.to_owned());
        self.with(move |mut c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                let id = new_id("acct");
                let row = tx
                    .query_one(
                        &format!(
                            "INSERT INTO accounts (id, name, email) VALUES ($1, $2, $3) RETURNING {ACCOUNT_COLUMNS}"
                        ),
                        &[&id, &name, &email],
                    )
                    .await
                    .map_err(|e| match pg_error(e) {
                        StoreError::Conflict(_) => {
                            StoreError::Conflict("an account with this email already exists".into())
                        }
                        other => other,
                    })?;
                tx.execute("INSERT INTO wallets (account_id) VALUES ($1)", &[&id])
                    .await
                    .map_err(pg_error)?;
                tx.commit().await.map_err(pg_error)?;
                account_from(&row)
            })
        })
        .await
    }

    async fn get_account(&self, id: &str) -> StoreResult<Account> {
        let id = id.to_owned();
        self.with(move |c| Box::pin(async move { get_account(&c, &id).await }))
            .await
    }

    async fn list_accounts(&self, limit: u32, after: Option<&str>) -> StoreResult<Vec<Account>> {
        let after = after.unwrap_or("").to_owned();
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id > $1 ORDER BY id LIMIT $2"),
                        &[&after, &(limit as i64)],
                    )
                    .await
                    .map_err(pg_error)?;
                rows.iter().map(account_from).collect()
            })
        })
        .await
    }

    async fn set_account_status(&self, id: &str, status: AccountStatus) -> StoreResult<Account> {
        let id = id.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        &format!("UPDATE accounts SET status = $2 WHERE id = $1 RETURNING {ACCOUNT_COLUMNS}"),
                        &[&id, &status.as_str()],
                    )
                    .await
                    .map_err(pg_error)?
                    .ok_or(StoreError::NotFound("account"))?;
                account_from(&row)
            })
        })
        .await
        .inspect(|account| self.announce(StoreEvent::Account(account.id.clone())))
    }

    async fn create_key(
        &self,
        account_id: &str,
        name: &str,
        digest: [u8; 32],
        prefix: &str,
        limits: &KeyLimits,
    ) -> StoreResult<KeyInfo> {
        let (account_id, name, prefix, limits) = (
            account_id.to_owned(),
            name.to_owned(),
            prefix.to_owned(),
            limits.clone(),
        );
        self.with(move |c| {
            Box::pin(async move {
                let account = get_account(&c, &account_id).await?;
                if account.status != AccountStatus::Active {
                    return Err(StoreError::Invalid(format!("the account is {}", account.status.as_str())));
                }
                let id = new_id("key");
                let row = c
                    .query_one(
                        &format!(
                            "INSERT INTO api_keys (id, account_id, name, prefix, digest, expires_at, allowed_models, rpm_limit, tpm_limit, budget_nano_usd)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {}",
                            KEY_COLUMNS.replace("k.", "")
                        ),
                        &[
                            &id,
                            &account_id,
                            &name,
                            &prefix,
                            &&digest[..],
                            &limits.expires_at,
                            &limits.allowed_models,
                            &limits.rpm_limit.map(|v| v as i32),
                            &limits.tpm_limit.map(|v| v as i32),
                            &limits.budget_nano_usd,
                        ],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(key_from(&row))
            })
        })
        .await
        .inspect(|_| self.announce(StoreEvent::Key(digest)))
    }

    async fn list_keys(&self, account_id: &str) -> StoreResult<Vec<KeyInfo>> {
        let account_id = account_id.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                get_account(&c, &account_id).await?;
                let rows = c
                    .query(
                        &format!(
                            "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.account_id = $1 ORDER BY k.created_at, k.id"
                        ),
                        &[&account_id],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(rows.iter().map(key_from).collect())
            })
        })
        .await
    }

    async fn revoke_key(&self, key_id: &str) -> StoreResult<()> {
        let key_id = key_id.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING digest",
                        &[&key_id],
                    )
                    .await
                    .map_err(pg_error)?
                    .ok_or(StoreError::NotFound("key"))?;
                Ok(row.get::<_, Vec<u8>>(0))
            })
        })
        .await
        .map(|digest| {
            if let Ok(digest) = <[u8; 32]>::try_from(digest.as_slice()) {
                self.announce(StoreEvent::Key(digest));
            }
        })
    }

    async fn find_key(&self, digest: [u8; 32]) -> StoreResult<Option<KeyRecord>> {
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        &format!(
                            "SELECT {KEY_COLUMNS}, a.status FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.digest = $1"
                        ),
                        &[&&digest[..]],
                    )
                    .await
                    .map_err(pg_error)?;
                row.map(|row| Ok(KeyRecord { key: key_from(&row), account_status: AccountStatus::parse(row.get(13))? }))
                    .transpose()
            })
        })
        .await
    }

    async fn touch_keys(&self, key_ids: &[String], at: DateTime<Utc>) -> StoreResult<()> {
        self.exec(
            "UPDATE api_keys SET last_used_at = GREATEST(COALESCE(last_used_at, $2), $2) WHERE id = ANY($1)",
            vec![Box::new(key_ids.to_vec()), Box::new(at)],
        )
        .await
        .map(drop)
    }

    async fn wallet(&self, account_id: &str) -> StoreResult<Wallet> {
        let account_id = account_id.to_owned();
        self.with(move |c| Box::pin(async move { get_wallet(&c, &account_id).await }))
            .await
    }

    async fn credit(&self, account_id: &str, amount: i64, kind: &str, reference: &str) -> StoreResult<(Wallet, bool)> {
        if amount <= 0 {
            return Err(StoreError::Invalid("a credit must be positive".into()));
        }
        let (account_id, kind, reference) = (account_id.to_owned(), kind.to_owned(), reference.to_owned());
        self.with(move |mut c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                get_account(&tx, &account_id).await?;
                let inserted = tx
                    .execute(
                        "INSERT INTO wallet_credits (kind, reference, account_id, amount_nano_usd) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (kind, reference) DO NOTHING",
                        &[&kind, &reference, &account_id, &amount],
                    )
                    .await
                    .map_err(pg_error)?
                    == 1;
                if inserted {
                    tx.execute(
                        "INSERT INTO wallets (account_id, balance_nano_usd, credited_nano_usd) VALUES ($1, $2, $2)
                         ON CONFLICT (account_id) DO UPDATE SET balance_nano_usd = wallets.balance_nano_usd + EXCLUDED.balance_nano_usd,
                         credited_nano_usd = wallets.credited_nano_usd + EXCLUDED.credited_nano_usd, updated_at = now()",
                        &[&account_id, &amount],
                    )
                    .await
                    .map_err(pg_error)?;
                    tx.execute(
                        "SELECT pg_notify('komilion_' || current_schema(), 'wallet:' || $1::text)",
                        &[&account_id],
                    )
                    .await
                    .map_err(pg_error)?;
                }
                let wallet = get_wallet(&tx, &account_id).await?;
                tx.commit().await.map_err(pg_error)?;
                Ok((wallet, inserted))
            })
        })
        .await
        .inspect(|(wallet, inserted)| {
            if *inserted {
                self.announce(StoreEvent::Wallet(wallet.account_id.clone()));
            }
        })
    }

    async fn keep_unmatched_payment(&self, p: &UnmatchedPayment) -> StoreResult<bool> {
        let p = p.clone();
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO stripe_unmatched (event_id, event_type, account_ref, amount_nano_usd, reason, received_at)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
                    &[&p.event_id, &p.event_type, &p.account_ref, &p.amount_nano_usd, &p.reason, &p.received_at],
                )
                .await
                .map(|n| n == 1)
                .map_err(pg_error)
            })
        })
        .await
    }

    async fn unmatched_payments(&self, limit: u32) -> StoreResult<Vec<UnmatchedPayment>> {
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT event_id, event_type, account_ref, amount_nano_usd, reason, received_at
                         FROM stripe_unmatched ORDER BY received_at DESC, event_id LIMIT $1",
                        &[&i64::from(limit)],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(rows
                    .iter()
                    .map(|r| UnmatchedPayment {
                        event_id: r.get(0),
                        event_type: r.get(1),
                        account_ref: r.get(2),
                        amount_nano_usd: r.get(3),
                        reason: r.get(4),
                        received_at: r.get(5),
                    })
                    .collect())
            })
        })
        .await
    }

    async fn put_provider_key(&self, account_id: &str, provider: &str, secret: &SealedSecret) -> StoreResult<()> {
        let (account_id, provider, secret) = (account_id.to_owned(), provider.to_owned(), secret.clone());
        self.with(move |c| {
            Box::pin(async move {
                get_account(&c, &account_id).await?;
                c.execute(
                    "INSERT INTO provider_keys (account_id, provider, key_version, nonce, ciphertext) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (account_id, provider) DO UPDATE SET key_version = EXCLUDED.key_version,
                     nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext, created_at = now()",
                    &[&account_id, &provider, &secret.key_version, &secret.nonce, &secret.ciphertext],
                )
                .await
                .map_err(pg_error)?;
                Ok(())
            })
        })
        .await
    }

    async fn get_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<Option<SealedSecret>> {
        let (account_id, provider) = (account_id.to_owned(), provider.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT key_version, nonce, ciphertext FROM provider_keys WHERE account_id = $1 AND provider = $2",
                        &[&account_id, &provider],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(row.map(|r| SealedSecret { key_version: r.get(0), nonce: r.get(1), ciphertext: r.get(2) }))
            })
        })
        .await
    }

    async fn list_provider_keys(&self, account_id: &str) -> StoreResult<Vec<ProviderKeyInfo>> {
        let account_id = account_id.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                get_account(&c, &account_id).await?;
                let rows = c
                    .query(
                        "SELECT provider, key_version, created_at FROM provider_keys WHERE account_id = $1 ORDER BY provider",
                        &[&account_id],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(rows
                    .iter()
                    .map(|r| ProviderKeyInfo { provider: r.get(0), key_version: r.get(1), created_at: r.get(2) })
                    .collect())
            })
        })
        .await
    }

    async fn delete_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<()> {
        let (account_id, provider) = (account_id.to_owned(), provider.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                let n = c
                    .execute(
                        "DELETE FROM provider_keys WHERE account_id = $1 AND provider = $2",
                        &[&account_id, &provider],
                    )
                    .await
                    .map_err(pg_error)?;
                if n == 0 {
                    return Err(StoreError::NotFound("provider key"));
                }
                Ok(())
            })
        })
        .await
    }

    async fn all_provider_keys(&self) -> StoreResult<Vec<(String, String, SealedSecret)>> {
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT account_id, provider, key_version, nonce, ciphertext FROM provider_keys ORDER BY account_id, provider",
                        &[],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), SealedSecret { key_version: r.get(2), nonce: r.get(3), ciphertext: r.get(4) }))
                    .collect())
            })
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
        self.with(move |mut c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                let account = get_account(&tx, &account_id).await?;
                if account.status != AccountStatus::Active {
                    return Err(StoreError::Invalid(format!("the account is {}", account.status.as_str())));
                }
                // The atomic conditional update (the same rule as `lease_grant`): take
                // min(balance, max(min, min(want, balance / 4))) only if the
                // balance covers `min`; concurrent leases serialize on the wallet's row.
                let row = tx
                    .query_opt(
                        "UPDATE wallets w SET balance_nano_usd = w.balance_nano_usd - LEAST(o.old, GREATEST($2::BIGINT, LEAST($3::BIGINT, o.old / 4))),
                                              updated_at = now()
                         FROM (SELECT balance_nano_usd AS old FROM wallets WHERE account_id = $1 FOR UPDATE) o
                         WHERE w.account_id = $1 AND o.old >= GREATEST($2::BIGINT, 1)
                         RETURNING o.old - w.balance_nano_usd, w.balance_nano_usd",
                        &[&account_id, &min, &want],
                    )
                    .await
                    .map_err(pg_error)?;
                let (grant, balance) = match row {
                    Some(row) => (row.get::<_, i64>(0), row.get::<_, i64>(1)),
                    None => {
                        let balance = tx
                            .query_opt("SELECT balance_nano_usd FROM wallets WHERE account_id = $1", &[&account_id])
                            .await
                            .map_err(pg_error)?
                            .map_or(0, |r| r.get::<_, i64>(0));
                        (0, balance)
                    }
                };
                let mut id = lease_id.unwrap_or_default();
                let grown = !id.is_empty()
                    && tx
                        .execute(
                            "UPDATE wallet_leases SET granted_nano_usd = granted_nano_usd + $2, expires_at = now() + make_interval(secs => $3)
                             WHERE id = $1 AND settled_at IS NULL",
                            &[&id, &grant, &secs(ttl)],
                        )
                        .await
                        .map_err(pg_error)?
                        == 1;
                if !grown {
                    id = String::new();
                    if grant > 0 {
                        id = new_id("lease");
                        tx.execute(
                            "INSERT INTO wallet_leases (id, account_id, instance_id, granted_nano_usd, expires_at)
                             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
                            &[&id, &account_id, &instance_id, &grant, &secs(ttl)],
                        )
                        .await
                        .map_err(pg_error)?;
                    }
                }
                tx.commit().await.map_err(pg_error)?;
                Ok(LeaseGrant { lease_id: id, granted_nano_usd: grant, balance_nano_usd: balance })
            })
        })
        .await
    }

    async fn extend_lease(&self, lease_id: &str, ttl: Duration) -> StoreResult<()> {
        self.exec(
            "UPDATE wallet_leases SET expires_at = now() + make_interval(secs => $2) WHERE id = $1 AND settled_at IS NULL",
            vec![Box::new(lease_id.to_owned()), Box::new(secs(ttl))],
        )
        .await
        .map(drop)
    }

    async fn settle_lease(&self, lease_id: &str, spent: i64) -> StoreResult<Option<i64>> {
        let lease_id = lease_id.to_owned();
        let result = self
            .with(move |mut c| {
                Box::pin(async move {
                    let tx = c.transaction().await.map_err(pg_error)?;
                    let row = tx
                        .query_opt(
                            "UPDATE wallet_leases SET settled_at = now(), spent_nano_usd = LEAST(GREATEST($2::BIGINT, 0), granted_nano_usd),
                                                      settled_by = 'owner'
                             WHERE id = $1 AND settled_at IS NULL
                             RETURNING account_id, granted_nano_usd - spent_nano_usd",
                            &[&lease_id, &spent],
                        )
                        .await
                        .map_err(pg_error)?;
                    let Some(row) = row else {
                        let exists = tx.query_opt("SELECT 1 FROM wallet_leases WHERE id = $1", &[&lease_id]).await.map_err(pg_error)?;
                        return if exists.is_some() { Ok(None) } else { Err(StoreError::NotFound("lease")) };
                    };
                    let (account_id, returned): (String, i64) = (row.get(0), row.get(1));
                    tx.execute(
                        "UPDATE wallets SET balance_nano_usd = balance_nano_usd + $2, updated_at = now() WHERE account_id = $1",
                        &[&account_id, &returned],
                    )
                    .await
                    .map_err(pg_error)?;
                    if returned > 0 {
                        tx.execute("SELECT pg_notify('komilion_' || current_schema(), 'wallet:' || $1::text)", &[&account_id])
                            .await
                            .map_err(pg_error)?;
                    }
                    tx.commit().await.map_err(pg_error)?;
                    Ok(Some((account_id, returned)))
                })
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
        self.with(move |mut c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                let expired = tx
                    .query(
                        "SELECT id, account_id, granted_nano_usd FROM wallet_leases
                         WHERE settled_at IS NULL AND expires_at < now() - make_interval(secs => $1)
                         FOR UPDATE SKIP LOCKED",
                        &[&secs(grace)],
                    )
                    .await
                    .map_err(pg_error)?;
                for row in &expired {
                    let (id, account_id, granted): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
                    let spent: i64 = tx
                        .query_one(
                            "SELECT COALESCE(sum(cost_nano_usd - unbilled_nano_usd), 0)::BIGINT FROM usage_records WHERE lease_id = $1",
                            &[&id],
                        )
                        .await
                        .map_err(pg_error)?
                        .get(0);
                    let spent = spent.clamp(0, granted);
                    tx.execute(
                        "UPDATE wallet_leases SET settled_at = now(), spent_nano_usd = $2, settled_by = 'reclaim' WHERE id = $1",
                        &[&id, &spent],
                    )
                    .await
                    .map_err(pg_error)?;
                    tx.execute(
                        "UPDATE wallets SET balance_nano_usd = balance_nano_usd + $2, updated_at = now() WHERE account_id = $1",
                        &[&account_id, &(granted - spent)],
                    )
                    .await
                    .map_err(pg_error)?;
                }
                tx.commit().await.map_err(pg_error)?;
                Ok(expired.len() as u64)
            })
        })
        .await
    }

    async fn insert_usage(&self, records: &[UsageRecord], rules: &AlertRules) -> StoreResult<u64> {
        let (records, rules) = (records.to_vec(), rules.clone());
        self.with(move |mut c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                tx.batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS usage_incoming (LIKE usage_records INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
                )
                .await
                .map_err(pg_error)?;
                let sink = tx
                    .copy_in(&format!("COPY usage_incoming ({USAGE_COLUMNS}) FROM STDIN (FORMAT binary)"))
                    .await
                    .map_err(pg_error)?;
                let types = [
                    Type::TEXT, Type::TEXT, Type::TEXT, Type::TIMESTAMPTZ, Type::TEXT, Type::TEXT, Type::TEXT,
                    Type::TEXT, Type::TEXT, Type::INT4, Type::INT8, Type::INT8, Type::INT8, Type::INT8, Type::INT8,
                    Type::INT8, Type::BOOL, Type::INT8, Type::INT8, Type::BOOL, Type::TEXT, Type::TEXT,
                ];
                let writer = BinaryCopyInWriter::new(sink, &types);
                futures::pin_mut!(writer);
                for r in &records {
                    let row: [&(dyn tokio_postgres::types::ToSql + Sync); 22] = [
                        &r.request_id, &r.account_id, &r.key_id, &r.created_at, &r.route, &r.requested_model,
                        &r.routed_model, &r.provider, &r.task, &(r.status as i32), &(r.input_tokens as i64),
                        &(r.output_tokens as i64), &(r.cached_tokens as i64), &(r.reasoning_tokens as i64),
                        &r.cost_nano_usd, &r.unbilled_nano_usd, &r.estimated, &(r.latency_ms as i64),
                        &r.ttfb_ms.map(|v| v as i64), &r.cache_hit, &r.lease_id, &r.end_user,
                    ];
                    writer.as_mut().write(&row).await.map_err(pg_error)?;
                }
                writer.finish().await.map_err(pg_error)?;
                let inserted = tx
                    .query(
                        &format!(
                            "INSERT INTO usage_records ({USAGE_COLUMNS}) SELECT {USAGE_COLUMNS} FROM usage_incoming
                             ON CONFLICT (request_id) DO NOTHING
                             RETURNING request_id, account_id, key_id, cost_nano_usd - unbilled_nano_usd, lease_id"
                        ),
                        &[],
                    )
                    .await
                    .map_err(pg_error)?;
                // Leases reclaimed after their instance vanished: their late usage is billed now.
                let lease_ids: Vec<String> = inserted.iter().filter_map(|r| r.get::<_, Option<String>>(4)).collect();
                let reclaimed: Vec<String> = if lease_ids.is_empty() {
                    Vec::new()
                } else {
                    tx.query("SELECT id FROM wallet_leases WHERE id = ANY($1) AND settled_by = 'reclaim'", &[&lease_ids])
                        .await
                        .map_err(pg_error)?
                        .iter()
                        .map(|r| r.get(0))
                        .collect()
                };
                let mut by_account: Vec<(String, i64)> = Vec::new();
                let mut by_key: Vec<(String, String, i64)> = Vec::new();
                for row in &inserted {
                    let (request_id, account_id, key_id, mut billed, lease): (String, String, Option<String>, i64, Option<String>) =
                        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
                    if lease.is_some_and(|l| reclaimed.contains(&l)) && billed > 0 {
                        let debit: i64 = tx
                            .query_one(
                                "UPDATE wallets w SET balance_nano_usd = w.balance_nano_usd - LEAST(o.old, $2)
                                 FROM (SELECT balance_nano_usd AS old FROM wallets WHERE account_id = $1 FOR UPDATE) o
                                 WHERE w.account_id = $1 RETURNING LEAST(o.old, $2)",
                                &[&account_id, &billed],
                            )
                            .await
                            .map_err(pg_error)?
                            .get(0);
                        tx.execute(
                            "UPDATE usage_records SET unbilled_nano_usd = unbilled_nano_usd + $2 WHERE request_id = $1",
                            &[&request_id, &(billed - debit)],
                        )
                        .await
                        .map_err(pg_error)?;
                        billed = debit;
                    }
                    match by_account.iter_mut().find(|(a, _)| *a == account_id) {
                        Some((_, sum)) => *sum += billed,
                        None => by_account.push((account_id.clone(), billed)),
                    }
                    if let Some(key) = key_id {
                        match by_key.iter_mut().find(|(k, _, _)| *k == key) {
                            Some((_, _, sum)) => *sum += billed,
                            None => by_key.push((key, account_id, billed)),
                        }
                    }
                }
                for (account_id, delta) in by_account.into_iter().filter(|(_, d)| *d != 0) {
                    let row = tx
                        .query_opt(
                            "UPDATE wallets SET spent_nano_usd = spent_nano_usd + $2 WHERE account_id = $1
                             RETURNING credited_nano_usd, spent_nano_usd",
                            &[&account_id, &delta],
                        )
                        .await
                        .map_err(pg_error)?;
                    if let Some(row) = row {
                        let after = row.get::<_, i64>(0) - row.get::<_, i64>(1);
                        if let Some(threshold) = crossed_below(after + delta, after, rules.wallet_below_nano_usd) {
                            tx.execute("INSERT INTO alert_outbox (payload) VALUES ($1)", &[&wallet_alert(&account_id, after, threshold)])
                                .await
                                .map_err(pg_error)?;
                        }
                    }
                }
                for (key_id, account_id, delta) in by_key.into_iter().filter(|(_, _, d)| *d != 0) {
                    let row = tx
                        .query_opt(
                            "UPDATE api_keys SET spent_nano_usd = spent_nano_usd + $2 WHERE id = $1 RETURNING spent_nano_usd, budget_nano_usd",
                            &[&key_id, &delta],
                        )
                        .await
                        .map_err(pg_error)?;
                    if let Some(row) = row {
                        let spent: i64 = row.get(0);
                        if let Some((budget, percent)) = crossed_share(spent - delta, spent, row.get(1), rules.key_budget_percent) {
                            tx.execute(
                                "INSERT INTO alert_outbox (payload) VALUES ($1)",
                                &[&key_alert(&account_id, &key_id, spent, budget, percent)],
                            )
                            .await
                            .map_err(pg_error)?;
                        }
                    }
                }
                tx.commit().await.map_err(pg_error)?;
                Ok(inserted.len() as u64)
            })
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
        self.with(move |c| {
            Box::pin(async move {
                let (after_t, after_id) = after.map_or((None, String::new()), |(t, id)| (Some(t), id));
                let rows = c
                    .query(
                        &format!(
                            "SELECT {USAGE_COLUMNS} FROM usage_records
                             WHERE account_id = $1 AND ($2::TEXT IS NULL OR key_id = $2)
                               AND ($3::TIMESTAMPTZ IS NULL OR created_at >= $3) AND ($4::TIMESTAMPTZ IS NULL OR created_at < $4)
                               AND ($5::TIMESTAMPTZ IS NULL OR (created_at, request_id) > ($5, $6))
                             ORDER BY created_at, request_id LIMIT $7"
                        ),
                        &[&filter.account_id, &filter.key_id, &filter.from, &filter.to, &after_t, &after_id, &(limit as i64)],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(rows.iter().map(usage_from).collect())
            })
        })
        .await
    }

    async fn purge_usage(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        self.exec(
            "DELETE FROM usage_records WHERE created_at < $1",
            vec![Box::new(before)],
        )
        .await
    }

    async fn erase_account(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        let account_id = id.clone();
        self.with(move |mut c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(pg_error)?;
                get_account(&tx, &id).await?;
                tx.execute(
                    "UPDATE accounts SET name = '', email = NULL, status = 'erased' WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(pg_error)?;
                tx.execute("DELETE FROM api_keys WHERE account_id = $1", &[&id])
                    .await
                    .map_err(pg_error)?;
                tx.execute("DELETE FROM provider_keys WHERE account_id = $1", &[&id])
                    .await
                    .map_err(pg_error)?;
                tx.execute("UPDATE usage_records SET key_id = NULL WHERE account_id = $1", &[&id])
                    .await
                    .map_err(pg_error)?;
                tx.commit().await.map_err(pg_error)
            })
        })
        .await?;
        self.announce(StoreEvent::Account(account_id));
        // Deleted keys are announced by the trigger; drop every cached key here at once too.
        self.announce(StoreEvent::Resync);
        Ok(())
    }

    async fn due_alerts(&self, limit: u32) -> StoreResult<Vec<PendingAlert>> {
        self.with(move |c| {
            Box::pin(async move {
                // Claimed for a minute, so that two instances never send the same alert at once.
                let rows = c
                    .query(
                        "UPDATE alert_outbox SET next_attempt_at = now() + interval '60 seconds'
                         WHERE id IN (SELECT id FROM alert_outbox WHERE next_attempt_at <= now() ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                         RETURNING id, payload, attempts",
                        &[&(limit as i64)],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(rows.iter().map(|r| PendingAlert { id: r.get(0), payload: r.get(1), attempts: r.get(2) }).collect())
            })
        })
        .await
    }

    async fn alert_delivered(&self, id: i64) -> StoreResult<()> {
        self.exec("DELETE FROM alert_outbox WHERE id = $1", vec![Box::new(id)])
            .await
            .map(drop)
    }

    async fn alert_failed(&self, id: i64, delay: Duration) -> StoreResult<()> {
        self.exec(
            "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $2) WHERE id = $1",
            vec![Box::new(id), Box::new(secs(delay))],
        )
        .await
        .map(drop)
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}
