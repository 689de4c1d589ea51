//! Usage ingest throughput: records per second written by the batcher's store call
//! (`insert_usage`: COPY into a temp table then one INSERT … ON CONFLICT for PostgreSQL,
//! batched transactions for SQLite), in batches of 1,000.
//! `cargo bench --bench usage_ingest` (PostgreSQL at 127.0.0.1:5432, or KOMILION_TEST_PG).

#![allow(clippy::unwrap_used)]

use komilion::store::{self, AlertRules, Store};
use komilion::usage::UsageRecord;
use std::time::Instant;

fn record(i: usize, account: &str) -> UsageRecord {
    UsageRecord {
        request_id: format!("{:032x}", i),
        account_id: account.into(),
        key_id: Some("key_bench".into()),
        created_at: chrono::Utc::now(),
        route: "chat_completions".into(),
        requested_model: Some("gpt-4o-mini".into()),
        routed_model: Some("gpt-4o-mini".into()),
        provider: Some("openai".into()),
        task: Some("general_chat".into()),
        status: 200,
        input_tokens: 120,
        output_tokens: 80,
        cached_tokens: 0,
        reasoning_tokens: 0,
        cost_nano_usd: 66_000,
        unbilled_nano_usd: 0,
        estimated: false,
        latency_ms: 900,
        ttfb_ms: Some(300),
        cache_hit: false,
        lease_id: None,
        end_user: None,
    }
}

async fn run(name: &str, store: &dyn Store, batches: usize) {
    let account = store
        .create_account("bench", &format!("{}@bench.example", store::new_id("b")))
        .await
        .unwrap();
    let rules = AlertRules::default();
    let batch = 1000;
    // Warm-up batch.
    let warm: Vec<_> = (0..batch).map(|i| record(i, &account.id)).collect();
    store.insert_usage(&warm, &rules).await.unwrap();
    let started = Instant::now();
    for b in 1..=batches {
        let records: Vec<_> = (b * batch..(b + 1) * batch).map(|i| record(i, &account.id)).collect();
        assert_eq!(store.insert_usage(&records, &rules).await.unwrap(), batch as u64);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{name}: {} records in {secs:.2} s = {:.0} records/s (batches of {batch})",
        batches * batch,
        (batches * batch) as f64 / secs
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs it once, quickly.
    let test_mode = !std::env::args().any(|a| a == "--bench");
    let batches = if test_mode { 1 } else { 50 };
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = store::open(&format!("sqlite://{}", dir.path().join("ingest.db").display()))
            .await
            .unwrap();
        run("sqlite", sqlite.as_ref(), batches).await;

        let base =
            std::env::var("KOMILION_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let Ok((client, connection)) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await else {
            println!("postgres: not reachable at {base}; skipped");
            return;
        };
        tokio::spawn(connection);
        let schema = format!("bench_{}", store::new_id("s").trim_start_matches("s_"));
        client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
        let pg = store::open(&format!("{base}?options=-c%20search_path%3D{schema}"))
            .await
            .unwrap();
        run("postgres", pg.as_ref(), batches).await;
        drop(pg);
        let _ = client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
    });
}
