#![allow(clippy::unwrap_used)]
//! Fixtures for integration tests: the real `komilion` binary on free ports, in front of
//! simulated providers started in the test process.

#![allow(dead_code)]

use komilion::mock_provider::{Behavior, MockConfig, MockProvider};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_komilion");
pub const CLIENT_KEY: &str = "sk-kml-test-client-key-0123456789";
pub const PROVIDER_KEY: &str = "sk-provider-secret-abcdef";

/// A port for a listener of a process under test. Ports come from 20000-32000, below Linux's
/// ephemeral range (so no client socket can be holding one), and a port is never handed out
/// twice in one test binary, so parallel tests cannot collide.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 60) * 200;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + n % 12_000).clamp(20_000, 32_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A simulated OpenAI provider that requires [`PROVIDER_KEY`].
pub async fn mock_provider(behavior: Behavior) -> MockProvider {
    MockProvider::start(
        MockConfig {
            api_key: Some(PROVIDER_KEY.into()),
            behavior,
            ..MockConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .expect("mock provider starts")
}

/// One provider entry of a test config.
pub struct ProviderSpec {
    pub name: String,
    /// The provider's `kind` (its API format): `openai` unless set.
    pub kind: &'static str,
    pub base_url: String,
    pub models: Vec<String>,
    pub first_byte_ms: u64,
    /// `timeouts.total_ms`: the whole exchange.
    pub total_ms: u64,
    /// More keys of the provider entry, as YAML lines indented by four spaces.
    pub extra: String,
}

impl ProviderSpec {
    /// This provider entry with more YAML keys (each line indented by four spaces).
    pub fn with(mut self, yaml: &str) -> ProviderSpec {
        self.extra.push_str(yaml);
        self
    }

    /// This provider entry speaking another API format.
    pub fn of_kind(mut self, kind: &'static str) -> ProviderSpec {
        self.kind = kind;
        self
    }

    pub fn new(name: &str, base_url: String, models: &[&str]) -> ProviderSpec {
        ProviderSpec {
            name: name.into(),
            kind: "openai",
            base_url,
            models: models.iter().map(|m| m.to_string()).collect(),
            first_byte_ms: 10_000,
            total_ms: 1_800_000,
            extra: String::new(),
        }
    }
}

/// `komilion serve -c <config>` with `flags` (e.g. `-u`), with the test environment.
fn spawn_serve(config_path: &std::path::Path, flags: &[&str]) -> Child {
    Command::new(BIN)
        .arg("serve")
        .args(flags)
        .arg("-c")
        .arg(config_path)
        .env("TEST_PROVIDER_KEY", PROVIDER_KEY)
        .env("KOMILION_MASTER_KEY", TEST_MASTER_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn komilion serve")
}

/// A gateway process on free ports.
pub struct GatewayProcess {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// Start `komilion serve` with these providers and static keys, `extra` YAML appended.
    pub fn start(providers: &[ProviderSpec], extra: &str) -> GatewayProcess {
        let plugins = format!(
            "plugins:\n  - name: request_id\n  - name: static_key_auth\n    settings:\n      keys:\n        - {{name: tester, key: \"{CLIENT_KEY}\", account: acct-1}}\n"
        );
        GatewayProcess::start_with(providers, &plugins, extra)
    }

    /// Start `komilion serve` with this `plugins:` section and `extra` YAML (e.g. `store:`).
    pub fn start_with(providers: &[ProviderSpec], plugins: &str, extra: &str) -> GatewayProcess {
        GatewayProcess::start_with_grace(providers, plugins, extra, 0)
    }

    /// [`Self::start_with`] with a shutdown grace period: requests in flight when a shutdown
    /// (or an upgrade's hand-over) begins get this long to finish before the process exits.
    pub fn start_with_grace(providers: &[ProviderSpec], plugins: &str, extra: &str, grace_secs: u64) -> GatewayProcess {
        let port = free_port();
        let metrics_port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut yaml = format!(
            "server:\n  threads: 2\n  grace_period_seconds: {grace_secs}\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {dir}/k.pid\n  upgrade_sock: {dir}/k.sock\nlisten:\n  gateway: [\"127.0.0.1:{port}\"]\n  metrics: \"127.0.0.1:{metrics_port}\"\nproviders:\n",
            dir = dir.path().display()
        );
        for p in providers {
            yaml.push_str(&format!(
                "  - name: {}\n    kind: {}\n    base_url: {}\n    api_key: ${{TEST_PROVIDER_KEY}}\n    models: [{}]\n    timeouts: {{connect_ms: 3000, first_byte_ms: {}, idle_ms: 10000, total_ms: {}}}\n{}",
                p.name,
                p.kind,
                p.base_url,
                p.models.join(", "),
                p.first_byte_ms,
                p.total_ms,
                p.extra
            ));
        }
        yaml.push_str(plugins);
        yaml.push_str(&extra.replace("{DIR}", &dir.path().display().to_string()));
        let config_path = dir.path().join("komilion.yaml");
        std::fs::write(&config_path, yaml).expect("write config");
        let child = spawn_serve(&config_path, &[]);
        let mut gw = GatewayProcess {
            child,
            port,
            metrics_port,
            config_path,
            _dir: dir,
        };
        gw.wait_ready();
        gw
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("komilion exited early: {status}");
            }
            if http_status(self.metrics_port, "/health") == Some(200)
                && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("komilion did not become ready");
    }
}

impl GatewayProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown work at all.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a graceful exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("komilion did not stop within 30 s of SIGTERM");
    }

    /// Start the same config again (after `kill` or `terminate`).
    pub fn restart(&mut self) {
        self.child = spawn_serve(&self.config_path, &[]);
        self.wait_ready();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status of a plain GET, or None when nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An async-openai client for the gateway.
pub fn openai_client(gw: &GatewayProcess, key: &str) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let config = async_openai::config::OpenAIConfig::new()
        .with_api_base(gw.base_url())
        .with_api_key(key);
    async_openai::Client::with_config(config)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A chat request body with one user message.
pub fn chat_body(model: &str, content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_owned))
        .collect()
}

/// Read everything from a raw socket until it closes or goes quiet.
pub fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The machine's PostgreSQL (trust auth); override with `KOMILION_TEST_PG`.
pub fn pg_base_url() -> String {
    std::env::var("KOMILION_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema in the test database, and a store URL whose connections use it. Each test
/// gets its own, so tests never see each other's rows.
pub async fn pg_schema_url() -> String {
    let base = pg_base_url();
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432");
    tokio::spawn(connection);
    let schema = format!("t_{}", komilion::store::new_id("s").trim_start_matches("s_"));
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("create schema");
    format!("{base}?options=-c%20search_path%3D{schema}")
}

/// A fresh SQLite file in a temp dir (kept alive by the returned guard).
pub fn sqlite_url() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("komilion.db").display());
    (dir, url)
}

/// A fixed master key for sealing provider keys in tests (32 bytes, base64).
pub const TEST_MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

pub const ADMIN_TOKEN: &str = "kml-admin-test-token-0123456789";

/// The admin API of a gateway.
#[derive(Clone)]
pub struct Admin {
    pub base: String,
    pub client: reqwest::Client,
}

impl Admin {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("admin call");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn wallet(&self, account: &str) -> serde_json::Value {
        let (status, w) = self
            .call(reqwest::Method::GET, &format!("/accounts/{account}/wallet"), None)
            .await;
        assert_eq!(status, 200, "{w}");
        w
    }

    /// Credit the account's wallet; returns the wallet after the top-up.
    pub async fn topup(&self, account: &str, amount_usd: &str) -> serde_json::Value {
        let (status, w) = self
            .call(
                reqwest::Method::POST,
                &format!("/accounts/{account}/wallet/topup"),
                Some(serde_json::json!({"amount_usd": amount_usd})),
            )
            .await;
        assert_eq!(status, 200, "{w}");
        w
    }

    /// The account's usage records (admin export, JSON lines).
    pub async fn usage(&self, account: &str) -> Vec<serde_json::Value> {
        let resp = self
            .client
            .get(format!("{}/accounts/{account}/usage?format=jsonl", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("export");
        assert_eq!(resp.status(), 200);
        resp.text()
            .await
            .expect("body")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Wait until `check` holds for the account's usage (the batcher writes every 200 ms).
    pub async fn usage_until(
        &self,
        account: &str,
        check: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let records = self.usage(account).await;
            if check(&records) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "usage never satisfied the check: {} records",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new account with a key and a balance; returns (account id, key id, secret).
    pub async fn account_with_key(
        &self,
        key_body: serde_json::Value,
        top_up_usd: Option<&str>,
    ) -> (String, String, String) {
        let email = format!("{}@example.com", komilion::store::new_id("user"));
        let (status, account) = self
            .call(
                reqwest::Method::POST,
                "/accounts",
                Some(serde_json::json!({"name": "Test", "email": email})),
            )
            .await;
        assert_eq!(status, 201, "{account}");
        let id = account["id"].as_str().unwrap().to_owned();
        let (status, key) = self
            .call(reqwest::Method::POST, &format!("/accounts/{id}/keys"), Some(key_body))
            .await;
        assert_eq!(status, 201, "{key}");
        if let Some(usd) = top_up_usd {
            let (status, w) = self
                .call(
                    reqwest::Method::POST,
                    &format!("/accounts/{id}/wallet/topup"),
                    Some(serde_json::json!({"amount_usd": usd})),
                )
                .await;
            assert_eq!(status, 200, "{w}");
        }
        (
            id,
            key["id"].as_str().unwrap().to_owned(),
            key["key"].as_str().unwrap().to_owned(),
        )
    }
}

impl GatewayProcess {
    /// A gateway on `store_url` with an admin listener and these plugins.
    pub fn with_store(
        providers: &[ProviderSpec],
        store_url: &str,
        plugins: &str,
        extra: &str,
    ) -> (GatewayProcess, Admin) {
        GatewayProcess::with_store_grace(providers, store_url, plugins, extra, 0)
    }

    pub fn with_store_grace(
        providers: &[ProviderSpec],
        store_url: &str,
        plugins: &str,
        extra: &str,
        grace_secs: u64,
    ) -> (GatewayProcess, Admin) {
        let admin_port = free_port();
        // Each gateway spools usage in its own temp dir, unless the test names one.
        let spool = if extra.contains("usage:") {
            ""
        } else {
            "usage:\n  spool_dir: \"{DIR}/spool\"\n"
        };
        let extra = format!(
            "store: \"{store_url}\"\nadmin:\n  listen: \"127.0.0.1:{admin_port}\"\n  token: \"{ADMIN_TOKEN}\"\n{spool}{extra}"
        );
        let gw = GatewayProcess::start_with_grace(providers, plugins, &extra, grace_secs);
        let admin = Admin {
            base: format!("http://127.0.0.1:{admin_port}/admin/v1"),
            client: http(),
        };
        (gw, admin)
    }
}

/// The default plugin chain of store-backed tests.
pub const STORE_PLUGINS: &str = "plugins:\n  - name: request_id\n  - name: key_auth\n  - name: rate_limit\n";

/// POST a chat completion with `key`; the status and JSON body.
pub async fn chat(gw: &GatewayProcess, key: &str, model: &str) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let resp = post_chat(gw, key, chat_body(model, "hello", false).to_string()).await;
    let headers = resp.headers().clone();
    let (status, body) = status_and_json(resp).await;
    (status, body, headers)
}

/// POST a chat completion body, sent exactly as given (JSON text), with `key`.
pub async fn post_chat(gw: &GatewayProcess, key: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("gateway answers")
}

/// POST a chat completion body with `key`; the status and the JSON answer.
pub async fn post_json(gw: &GatewayProcess, key: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    status_and_json(post_chat(gw, key, body.to_string()).await).await
}

/// An answer's status and JSON body (null when the body is not JSON).
pub async fn status_and_json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// A TCP relay in front of a server, which a test can cut (every connection dropped, new ones
/// closed at once) and restore: a store outage without stopping the shared server.
pub struct Relay {
    pub port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *watch.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Relay { port, cut }
    }

    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

impl GatewayProcess {
    /// A graceful upgrade as systemd's reload does it: start a new process with `-u` on the same
    /// config, SIGQUIT the old one (it hands its listeners over and drains), and wait until the
    /// old one has exited. `self` is the new process afterwards.
    pub fn upgrade(&mut self) {
        let sock = self.config_path.with_file_name("k.sock");
        let _ = std::fs::remove_file(&sock);
        let new = spawn_serve(&self.config_path, &["-u"]);
        // The new process listens on the upgrade socket once it is ready to take the fds.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "the new process never opened {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut old = std::mem::replace(&mut self.child, new);
        let _ = Command::new("kill").args(["-QUIT", &old.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = old.try_wait() {
                break;
            }
            assert!(Instant::now() < deadline, "the old process did not exit after SIGQUIT");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_ready();
    }

    /// The value of a metric series (the first line starting with `series`), polled until
    /// `check` holds or a generous deadline passes.
    pub async fn metric_until(&self, series: &str, check: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = http()
                .get(self.metrics_url())
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics body");
            let value = text
                .lines()
                .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if check(value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{series} stayed at {value}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A provider written by hand for one test: every connection's request (head and
/// `content-length` body) is read whole, then `answer` gets the socket and the request's bytes
/// to write whatever the test needs. Returns the base URL.
pub async fn hand_written_provider<F, Fut>(answer: F) -> String
where
    F: Fn(tokio::net::TcpStream, Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                if let Some(request) = read_request(&mut s).await {
                    answer(s, request).await;
                }
            });
        }
    });
    format!("http://127.0.0.1:{port}/v1")
}

/// One HTTP/1.1 request: its head, then as many body bytes as `content-length` says. None if
/// the connection closes first.
async fn read_request(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut request = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&request);
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if request.len() >= end + 4 + len {
                return Some(request);
            }
        }
    }
}
