#![allow(clippy::unwrap_used)]
//! The usage log under what real operation throws at it: client strings a store cannot hold,
//! records the store refuses, a graceful upgrade under load, a spool directory that fills up or
//! turns read-only. On both stores where the store matters.

mod common;

use common::*;
use komilion::usage::UsageRecord;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn sim(mock: &komilion::mock_provider::MockProvider) -> Vec<ProviderSpec> {
    vec![ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])]
}

fn spool_config(spool: &Path) -> String {
    format!("usage:\n  spool_dir: \"{}\"\n", spool.display())
}

/// POST a raw chat body; the status, the usage record id and the JSON body.
async fn post_raw(gw: &GatewayProcess, key: &str, body: String) -> (u16, Option<String>, Value) {
    let resp = post_chat(gw, key, body).await;
    let id = resp
        .headers()
        .get("x-komilion-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, body) = status_and_json(resp).await;
    (status, id, body)
}

fn record(account: &str, request_id: &str, model: &str) -> UsageRecord {
    UsageRecord {
        request_id: request_id.into(),
        account_id: account.into(),
        key_id: None,
        created_at: chrono::Utc::now(),
        route: "chat".into(),
        requested_model: Some(model.into()),
        routed_model: Some(model.into()),
        provider: Some("sim".into()),
        task: None,
        status: 200,
        input_tokens: 3,
        output_tokens: 4,
        cached_tokens: 0,
        reasoning_tokens: 0,
        cost_nano_usd: 1000,
        unbilled_nano_usd: 0,
        estimated: false,
        latency_ms: 1,
        ttfb_ms: Some(1),
        cache_hit: false,
        lease_id: None,
        end_user: None,
    }
}

/// Client strings a store cannot hold are refused at the edge, and records the store refuses
/// anyway (here written into the spool by hand, as an older version or a plugin could have) are
/// dead-lettered one by one while every other record lands.
async fn poison_records_never_hold_up_the_others(store_url: &str) {
    let mock = mock_provider(Default::default()).await;
    let spool = tempfile::tempdir().unwrap();
    let (mut gw, admin) =
        GatewayProcess::with_store(&sim(&mock), store_url, STORE_PLUGINS, &spool_config(spool.path()));
    let (account, _, secret) = admin.account_with_key(json!({"name": "p"}), Some("10")).await;

    let normal = chat_body("gpt-4o-mini", "hi", false).to_string();
    let huge = "m".repeat(64 * 1024);
    let poison = [
        r#"{"model":"gpt\u0000x","messages":[{"role":"user","content":"hi"}]}"#.to_owned(),
        format!(r#"{{"model":"{huge}","messages":[{{"role":"user","content":"hi"}}]}}"#),
        r#"{"model":"\ud800","messages":[{"role":"user","content":"hi"}]}"#.to_owned(),
        r#"{"model":"gpt-4o-mini","user":"a\u0007b","messages":[{"role":"user","content":"hi"}]}"#.to_owned(),
    ];
    let mut served = Vec::new();
    for bad in poison {
        let (status, id, _) = post_raw(&gw, &secret, normal.clone()).await;
        assert_eq!(status, 200);
        served.push(id.unwrap());
        let (status, _, body) = post_raw(&gw, &secret, bad.clone()).await;
        assert_eq!(status, 400, "{}: {body}", &bad[..bad.len().min(80)]);
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    let records = admin
        .usage_until(&account, |r| {
            served.iter().all(|id| r.iter().any(|x| x["request_id"] == id.as_str()))
        })
        .await;
    for r in &records {
        let model = r["requested_model"].as_str().unwrap_or("");
        assert!(model.len() <= 256 && !model.contains('\0'), "{r}");
    }

    // Records the store refuses, between good ones, in a sealed segment from "an earlier run".
    gw.terminate();
    let mut bad_nul = record(&account, "req_bad_nul", "gpt\0x");
    bad_nul.end_user = Some("x\0".into());
    let injected = [
        record(&account, "req_good_1", "gpt-4o-mini"),
        bad_nul,
        record(&account, "req_good_2", "gpt-4o-mini"),
        record(&account, "req_bad_long", &huge),
        record(&account, "req_good_3", "gpt-4o-mini"),
    ];
    let mut segment = String::new();
    for r in &injected {
        segment.push_str(&serde_json::to_string(r).unwrap());
        segment.push('\n');
    }
    std::fs::write(spool.path().join("usage-90000000.jsonl"), segment).unwrap();
    gw.restart();

    let (status, id, _) = post_raw(&gw, &secret, normal.clone()).await;
    assert_eq!(status, 200);
    served.push(id.unwrap());
    for good in ["req_good_1", "req_good_2", "req_good_3"] {
        served.push(good.to_owned());
    }
    let records = admin
        .usage_until(&account, |r| {
            served.iter().all(|id| r.iter().any(|x| x["request_id"] == id.as_str()))
        })
        .await;
    assert!(
        !records
            .iter()
            .any(|r| r["request_id"].as_str().unwrap().starts_with("req_bad")),
        "refused records are not in the store"
    );
    gw.metric_until("komilion_usage_dead_letters_total", |v| v == 2.0).await;
    let dead = std::fs::read_to_string(spool.path().join("dead-letters.jsonl")).unwrap();
    let dead: Vec<Value> = dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        dead.iter()
            .map(|d| d["record"]["request_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["req_bad_nul", "req_bad_long"]
    );
    assert!(dead.iter().all(|d| !d["reason"].as_str().unwrap().is_empty()));

    // The CSV export holds every good record too.
    let csv = admin
        .client
        .get(format!("{}/accounts/{account}/usage?format=csv", admin.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for id in &served {
        assert!(csv.contains(id.as_str()), "{id} in the CSV export");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_never_hold_up_the_others_on_sqlite() {
    let (_db, url) = sqlite_url();
    poison_records_never_hold_up_the_others(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_never_hold_up_the_others_on_postgres() {
    let url = pg_schema_url().await;
    poison_records_never_hold_up_the_others(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_spool_is_refused() {
    let mock = mock_provider(Default::default()).await;
    let spool = tempfile::tempdir().unwrap();
    let (_db, url) = sqlite_url();
    let (_gw, _) = GatewayProcess::with_store(&sim(&mock), &url, STORE_PLUGINS, &spool_config(spool.path()));
    let (_db2, url2) = sqlite_url();
    let config = format!(
        "listen:\n  gateway: [\"127.0.0.1:{}\"]\nstore: \"{url2}\"\nproviders: []\n{}",
        free_port(),
        spool_config(spool.path())
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("second.yaml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&path)
        .env("KOMILION_MASTER_KEY", TEST_MASTER_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spool") && stderr.contains(&spool.path().display().to_string()),
        "the error names the spool directory in use: {stderr}"
    );
}

/// `-u` + SIGQUIT (systemd's reload) while clients keep sending: no request fails and every 200
/// has exactly one usage record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_fails_nothing_and_loses_no_record() {
    let mock = mock_provider(Default::default()).await;
    let (_db, url) = sqlite_url();
    let spool = tempfile::tempdir().unwrap();
    // A grace period as in production: requests the old process accepted before it stopped
    // listening finish there (with none, Pingora drops them at once).
    let (mut gw, admin) =
        GatewayProcess::with_store_grace(&sim(&mock), &url, STORE_PLUGINS, &spool_config(spool.path()), 3);
    let (account, _, secret) = admin.account_with_key(json!({"name": "u"}), Some("100")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let served: Arc<Mutex<Vec<String>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let url = gw.url("/v1/chat/completions");
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, served, failed, url, secret) = (
            stop.clone(),
            served.clone(),
            failed.clone(),
            url.clone(),
            secret.clone(),
        );
        clients.push(tokio::spawn(async move {
            // A connection per request: a keep-alive connection the old process closes while a
            // request is being written is a race every proxy has on reload, which clients
            // retry; this test is about the gateway dropping nothing it accepted.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let result = client
                    .post(&url)
                    .bearer_auth(&secret)
                    .json(&chat_body("gpt-4o-mini", "during the upgrade", false))
                    .send()
                    .await;
                match result {
                    Ok(resp) if resp.status() == 200 => {
                        let id = resp.headers()["x-komilion-request-id"].to_str().unwrap().to_owned();
                        if resp.bytes().await.is_ok() {
                            served.lock().unwrap().push(id);
                        } else {
                            failed.lock().unwrap().push(format!("{id}: body cut"));
                        }
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        let body = resp.text().await.unwrap_or_default();
                        failed.lock().unwrap().push(format!("status {status}: {body}"));
                    }
                    Err(e) => failed.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    let wait_for = |n: usize| {
        let served = served.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while served.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "the load stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(20).await;
    tokio::task::block_in_place(|| gw.upgrade());
    let after = served.lock().unwrap().len();
    wait_for(after + 20).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "failed requests during the upgrade: {failed:?}");
    let served = served.lock().unwrap().clone();
    let records = admin.usage_until(&account, |r| r.len() >= served.len()).await;
    let mut ids: Vec<&str> = records.iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut expected: Vec<&str> = served.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "exactly one record per served request");
}

/// Mount `fs` at `dir` (root only); false where this machine does not allow it.
fn mount(args: &[&str], dir: &Path) -> bool {
    std::process::Command::new("mount")
        .args(args)
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

fn umount(dir: &Path) {
    let ok = std::process::Command::new("umount")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "umount {}", dir.display());
}

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn paid(gw: &GatewayProcess, secret: &str) -> (u16, Value) {
    let (status, _, body) = post_raw(gw, secret, chat_body("gpt-4o-mini", "hi", false).to_string()).await;
    (status, body)
}

/// Send paid requests until one gets `want`; its body, counting the 200s served on the way.
async fn status_until(gw: &GatewayProcess, secret: &str, want: u16, served: &mut usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = paid(gw, secret).await;
        *served += usize::from(status == 200);
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "never got {want}; last {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A spool on a disk that fills up, then a spool directory that turns read-only: paid requests
/// get a 503 in OpenAI's shape (never served unbilled), and both recover on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_cannot_be_written_refuses_paid_requests_and_recovers() {
    let base = tempfile::tempdir().unwrap();
    let spool = base.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    if !mount(&["-t", "tmpfs", "-o", "size=512k", "tmpfs"], &spool) {
        eprintln!("skipped: this machine does not let the test mount a tmpfs");
        return;
    }
    let _mounted = Mounted(spool.clone());
    let mock = mock_provider(Default::default()).await;
    let (_db, url) = sqlite_url();
    let (gw, admin) = GatewayProcess::with_store(&sim(&mock), &url, STORE_PLUGINS, &spool_config(&spool));
    let (account, _, secret) = admin.account_with_key(json!({"name": "d"}), Some("10")).await;
    assert_eq!(paid(&gw, &secret).await.0, 200);
    let mut served = 1;

    // Disk full.
    let filler = spool.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let body = status_until(&gw, &secret, 503, &mut served).await;
    assert_eq!(body["error"]["code"], "usage_log_unavailable", "{body}");
    gw.metric_until("komilion_usage_spool_writable", |v| v == 0.0).await;
    std::fs::remove_file(&filler).unwrap();
    status_until(&gw, &secret, 200, &mut served).await;
    gw.metric_until("komilion_usage_spool_writable", |v| v == 1.0).await;

    // The directory turns read-only (a read-only filesystem mounted over it).
    assert!(
        mount(&["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"], &spool),
        "mount ro"
    );
    let ro = Mounted(spool.clone());
    status_until(&gw, &secret, 503, &mut served).await;
    umount(&spool);
    std::mem::forget(ro);
    status_until(&gw, &secret, 200, &mut served).await;

    // Every 200 has its record, including those served while the disk was filling up (kept in
    // memory until the spool took them); the 503s were never forwarded.
    let records = admin
        .usage_until(&account, |r| r.iter().filter(|x| x["status"] == 200).count() >= served)
        .await;
    assert_eq!(records.iter().filter(|x| x["status"] == 200).count(), served);
    assert_eq!(
        mock.request_count() as usize,
        served,
        "no refused request reached the provider"
    );
}
