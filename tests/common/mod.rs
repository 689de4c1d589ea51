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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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
    pub base_url: String,
    pub models: Vec<String>,
    pub first_byte_ms: u64,
}

impl ProviderSpec {
    pub fn new(name: &str, base_url: String, models: &[&str]) -> ProviderSpec {
        ProviderSpec {
            name: name.into(),
            base_url,
            models: models.iter().map(|m| m.to_string()).collect(),
            first_byte_ms: 10_000,
        }
    }
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

    /// Start `komilion serve` with these providers, `extra` YAML appended (e.g. `limits:`).
    pub fn start(providers: &[ProviderSpec], extra: &str) -> GatewayProcess {
        let port = free_port();
        let metrics_port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut yaml = format!(
            "server:\n  threads: 2\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {dir}/k.pid\n  upgrade_sock: {dir}/k.sock\nlisten:\n  gateway: [\"127.0.0.1:{port}\"]\n  metrics: \"127.0.0.1:{metrics_port}\"\nproviders:\n",
            dir = dir.path().display()
        );
        for p in providers {
            yaml.push_str(&format!(
                "  - name: {}\n    kind: openai\n    base_url: {}\n    api_key: ${{TEST_PROVIDER_KEY}}\n    models: [{}]\n    timeouts: {{connect_ms: 1000, first_byte_ms: {}, idle_ms: 2000}}\n",
                p.name,
                p.base_url,
                p.models.join(", "),
                p.first_byte_ms
            ));
        }
        yaml.push_str(&format!(
            "plugins:\n  - name: request_id\n  - name: static_key_auth\n    settings:\n      keys:\n        - {{name: tester, key: \"{CLIENT_KEY}\", account: acct-1}}\n"
        ));
        yaml.push_str(extra);
        let config_path = dir.path().join("komilion.yaml");
        std::fs::write(&config_path, yaml).expect("write config");
        let child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&config_path)
            .env("TEST_PROVIDER_KEY", PROVIDER_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn komilion");
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
