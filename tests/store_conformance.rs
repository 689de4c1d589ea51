#![allow(clippy::unwrap_used)]
//! The store conformance suite against both implementations: embedded SQLite and PostgreSQL
//! (the machine's server, a fresh schema per case).

mod common;

use komilion::store::{self, conformance};

macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_dir, url) = super::common::sqlite_url();
                    let store = super::store::open(&url).await.unwrap();
                    super::conformance::$case(store.as_ref()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let url = super::common::pg_schema_url().await;
                    let store = super::store::open(&url).await.unwrap();
                    assert_eq!(store.backend(), "postgres");
                    super::conformance::$case(store.as_ref()).await;
                }
            )*
        }
    };
}

both_backends!(accounts, keys, wallets, provider_keys, change_events, leases, usage_log);

async fn migrations_run_once(url: &str) {
    let first = store::open(url).await.unwrap();
    let account = first.create_account("kept", "kept@example.com").await.unwrap();
    drop(first);
    let second = store::open(url).await.unwrap();
    assert_eq!(
        second.get_account(&account.id).await.unwrap().name,
        "kept",
        "a second start keeps the data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrations_are_idempotent() {
    let (_dir, url) = common::sqlite_url();
    migrations_run_once(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_are_idempotent() {
    let url = common::pg_schema_url().await;
    migrations_run_once(&url).await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let n: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n as usize,
        komilion::store::MIGRATIONS_POSTGRES,
        "every migration recorded once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_fails_fast() {
    let port = common::free_port();
    let started = std::time::Instant::now();
    let result = store::open(&format!("postgres://postgres@127.0.0.1:{port}/test")).await;
    assert!(
        matches!(result, Err(store::StoreError::Unavailable(_))),
        "{:?}",
        result.err()
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "no hang");
}
