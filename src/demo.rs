//! `komilion demo`: the gateway on its embedded defaults, in front of the simulated provider,
//! with a fresh demo key. Needs no external service and no network.

use crate::catalog::Catalog;
use crate::config::Config;
use crate::mock_provider::{Behavior, MockConfig, MockProvider};
use crate::money::Usd;
use crate::server::build_server;
use pingora::server::configuration::Opt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Print one JSON line when ready instead of the human instructions.
    pub json: bool,
    /// Gateway port; 8080, or a free port if 8080 is taken.
    pub port: Option<u16>,
    /// Metrics port; 9090, or a free port if taken.
    pub metrics_port: Option<u16>,
    /// Admin API port; 9091, or a free port if taken.
    pub admin_port: Option<u16>,
    /// Delay between streamed chunks of the simulated provider, to watch streaming happen.
    pub chunk_delay_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the simulated provider: {0}")]
    Provider(std::io::Error),
    #[error("no free port: {0}")]
    Port(std::io::Error),
    #[error("cannot listen on 127.0.0.1:{0}: {1}; is another komilion or another server already there?")]
    PortTaken(u16, std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigErrors),
    #[error(transparent)]
    Build(#[from] crate::server::BuildError),
    #[error("cannot prepare the demo store: {0}")]
    Store(String),
}

/// The port asked for, else the preferred one if free, else any free port.
fn pick_port(asked: Option<u16>, preferred: u16) -> Result<u16, DemoError> {
    if let Some(p) = asked {
        // Checked before anything else happens: the demo's data directory is named after the
        // port, and a demo already running there must be left alone.
        return TcpListener::bind(("127.0.0.1", p))
            .map(|_| p)
            .map_err(|e| DemoError::PortTaken(p, e));
    }
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    let l = TcpListener::bind(("127.0.0.1", 0)).map_err(DemoError::Port)?;
    l.local_addr().map(|a| a.port()).map_err(DemoError::Port)
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// The catalog's models of one provider family: the simulated provider serves them in that
/// family's format.
fn demo_models(catalog: &Catalog, provider: &str) -> Vec<String> {
    catalog
        .models()
        .iter()
        .filter(|m| m.provider == provider)
        .map(|m| m.id.clone())
        .collect()
}

fn yaml_list(models: &[String]) -> String {
    models.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ")
}

/// Run the demo until the process is stopped.
pub fn run(options: DemoOptions) -> Result<(), DemoError> {
    let catalog = Catalog::embedded();
    let openai_models = demo_models(&catalog, "openai");
    let anthropic_models = demo_models(&catalog, "anthropic");
    let gemini_models = demo_models(&catalog, "gemini");
    let models: Vec<String> = openai_models
        .iter()
        .chain(&anthropic_models)
        .chain(&gemini_models)
        .cloned()
        .collect();
    let provider_key = format!("sk-sim-{}", random_hex(16));
    let mock = MockProvider::start_in_thread(
        MockConfig {
            api_key: Some(provider_key.clone()),
            behavior: Behavior {
                chunk_delay_ms: options.chunk_delay_ms,
                ..Behavior::default()
            },
            models: models.clone(),
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
        1,
    )
    .map_err(DemoError::Provider)?;

    let port = pick_port(options.port, 8080)?;
    let metrics_port = pick_port(options.metrics_port, 9090)?;
    let admin_port = pick_port(options.admin_port, 9091)?;
    let admin_token = format!("kml-admin-{}", random_hex(16));
    let data_dir = std::env::temp_dir().join(format!("komilion-demo-{port}"));
    let _ = std::fs::remove_dir_all(&data_dir);
    let store_url = format!("sqlite://{}", data_dir.join("komilion.db").display());
    let (account_id, demo_key) = prepare_store(&store_url)?;
    let yaml = format!(
        r#"
server:
  threads: 2
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  pid_file: /tmp/komilion-demo-{port}.pid
  upgrade_sock: /tmp/komilion-demo-{port}.sock
listen:
  gateway: ["127.0.0.1:{port}"]
  metrics: "127.0.0.1:{metrics_port}"
providers:
  - name: openai
    kind: openai
    base_url: {base}
    api_key: {provider_key}
    models: [{openai_list}]
  - name: anthropic
    kind: anthropic
    base_url: {base}
    api_key: {provider_key}
    models: [{anthropic_list}]
  - name: gemini
    kind: gemini
    base_url: http://{addr}/v1beta
    api_key: {provider_key}
    models: [{gemini_list}]
store: "{store_url}"
admin:
  listen: "127.0.0.1:{admin_port}"
  token: "{admin_token}"
usage:
  spool_dir: "{spool_dir}"
plugins:
  - name: request_id
  - name: key_auth
  - name: rate_limit
"#,
        base = mock.base_url(),
        openai_list = yaml_list(&openai_models),
        anthropic_list = yaml_list(&anthropic_models),
        gemini_list = yaml_list(&gemini_models),
        addr = mock.addr(),
        spool_dir = data_dir.join("spool").display()
    );
    let config = Config::from_yaml(&yaml, &|_| None)?;
    let server = build_server(&config, Opt::default())?;

    let json = options.json;
    std::thread::spawn(move || {
        let gateway = SocketAddr::from(([127, 0, 0, 1], port));
        let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
        if !wait_ready(gateway, metrics, Duration::from_secs(30)) {
            eprintln!("komilion demo: the gateway did not become ready within 30 s");
            std::process::exit(1);
        }
        let base_url = format!("http://127.0.0.1:{port}/v1");
        let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let mut out = std::io::stdout().lock();
        if json {
            let line = serde_json::json!({
                "base_url": base_url,
                "api_key": demo_key,
                "account_id": account_id,
                "metrics_url": metrics_url,
                "admin_url": format!("http://127.0.0.1:{admin_port}/admin/v1"),
                "admin_token": admin_token,
                "health_url": format!("http://127.0.0.1:{metrics_port}/health"),
                "models": models,
            });
            let _ = writeln!(out, "{line}");
        } else {
            let admin = (
                format!("http://127.0.0.1:{admin_port}/admin/v1"),
                admin_token,
                account_id,
            );
            let text = instructions(&base_url, &demo_key, &metrics_url, &admin, &catalog, &models);
            let _ = write!(out, "{text}");
        }
        let _ = out.flush();
        drop(mock);
        // The provider thread keeps serving; this thread is done.
    });
    server.run_forever()
}

/// Create the demo account with a key and $10 in its wallet. Returns the account id and key.
fn prepare_store(url: &str) -> Result<(String, String), DemoError> {
    use crate::admin::ops;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Store(e.to_string()))?;
    runtime.block_on(async {
        let store = crate::store::open(url)
            .await
            .map_err(|e| DemoError::Store(e.to_string()))?;
        let fail = |e: ops::OpError| DemoError::Store(e.to_string());
        let account = ops::create_account(
            store.as_ref(),
            ops::CreateAccount {
                name: "Demo".into(),
                email: "demo@example.com".into(),
            },
        )
        .await
        .map_err(fail)?;
        let id = account["id"].as_str().unwrap_or_default().to_owned();
        let key = ops::create_key(
            store.as_ref(),
            &id,
            ops::CreateKey {
                name: "demo".into(),
                ..Default::default()
            },
        )
        .await
        .map_err(fail)?;
        ops::top_up(
            store.as_ref(),
            &id,
            ops::TopUp {
                amount_usd: "10".into(),
            },
            Some("demo-credit"),
        )
        .await
        .map_err(fail)?;
        Ok((id, key["key"].as_str().unwrap_or_default().to_owned()))
    })
}

/// Both listeners accept connections and `/health` answers 200.
fn wait_ready(gateway: SocketAddr, metrics: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let up = TcpStream::connect_timeout(&gateway, Duration::from_millis(200)).is_ok() && health_ok(metrics);
        if up {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn health_ok(metrics: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&metrics, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

fn instructions(
    base_url: &str,
    key: &str,
    metrics_url: &str,
    (admin_url, admin_token, account_id): &(String, String, String),
    catalog: &Catalog,
    models: &[String],
) -> String {
    let mut prices = String::new();
    for m in models.iter().filter_map(|m| catalog.get(m)) {
        prices.push_str(&format!(
            "    {:<18} ${} in / ${} out per 1M tokens\n",
            m.id,
            Usd(m.price.input),
            Usd(m.price.output)
        ));
    }
    format!(
        r#"Komilion demo is ready: the gateway in front of simulated OpenAI, Anthropic and Gemini providers (no network needed).

  base_url  {base_url}
  api_key   {key}   (account {account_id}, $10 in its wallet)
  metrics   {metrics_url}
  admin     {admin_url}   (Authorization: Bearer {admin_token})

  models (real names and prices; the answers are simulated):
{prices}
Try it with curl:

  curl {base_url}/chat/completions \
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello!"}}]}}' -i

Or with the official Python SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="{key}")
  reply = client.chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)
  for chunk in client.chat.completions.create(
          model="gpt-4o-mini", stream=True, messages=[{{"role": "user", "content": "Stream, please"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Any model through either API: Claude or Gemini through OpenAI's SDK above
(model="claude-sonnet-4-5", "gemini-2.5-flash"), or any model through Anthropic's SDK
(pip install anthropic):

  import anthropic
  client = anthropic.Anthropic(base_url="{root_url}", api_key="{key}")
  message = client.messages.create(model="claude-sonnet-4-5", max_tokens=200,
      messages=[{{"role": "user", "content": "Hello!"}}])
  print(message.content[0].text)

The admin API (accounts, keys, wallets):

  curl {admin_url}/accounts/{account_id}/wallet -H "Authorization: Bearer {admin_token}"

Press Ctrl-C to stop.
"#,
        root_url = base_url.trim_end_matches("/v1"),
    )
}
