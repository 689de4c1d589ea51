#![allow(clippy::unwrap_used)]
//! The command line: `check`, `demo --json`, `mock-provider`, `serve -t`.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn write_config(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("komilion.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn check_lists_every_error_with_its_path() {
    let (_dir, path) = write_config(
        r#"
listen:
  gateway: ["localhost"]
  metrics: 127.0.0.1:9090
  admni: 1
providers:
  - name: a
    kind: openai
    base_url: ftp://example.com
    api_key: ${KOMILION_TEST_UNSET_VAR}
  - name: b
    kind: openai
    base_url: http://127.0.0.1:1/v1
    api_key: k
    modles: [x]
plugins:
  - name: static_key_auth
    settings: {keys: [{name: a, key: short}]}
  - name: no_such_plugin
"#,
    );
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("KOMILION_TEST_UNSET_VAR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for path in [
        "listen.admni",
        "providers[0].api_key",
        "providers[1].modles",
        "providers[0].base_url",
    ] {
        assert!(stderr.contains(path), "{path} missing from:\n{stderr}");
    }

    // With the file's own errors fixed, plugin settings are checked too.
    let (_dir, path) = write_config(
        "providers: []\nplugins:\n  - name: static_key_auth\n    settings: {keys: [{name: a, key: short}]}\n  - name: no_such_plugin\n",
    );
    let out = Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plugins[0].settings.keys[0].key"), "{stderr}");
    assert!(stderr.contains("plugins[1].name"), "{stderr}");

    let out = Command::new(BIN)
        .args(["check", "-c", "conf/komilion.yaml"])
        .env("OPENAI_API_KEY", "sk-x")
        .env("ANTHROPIC_API_KEY", "sk-ant-x")
        .env("KOMILION_ADMIN_TOKEN", "an-admin-token-of-some-length")
        .env("STRIPE_WEBHOOK_SECRET", "whsec_x")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_test_mode_validates_and_exits() {
    let (_dir, path) = write_config(&format!(
        "listen:\n  gateway: [\"127.0.0.1:{}\"]\n  metrics: \"127.0.0.1:{}\"\nproviders: []\n",
        free_port(),
        free_port()
    ));
    let status = Command::new(BIN)
        .args(["serve", "-t", "-c"])
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_a_ready_line_that_works() {
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--json",
            "--port",
            &free_port().to_string(),
            "--metrics-port",
            &free_port().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .unwrap()
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let base_url = ready["base_url"].as_str().unwrap();
    let key = ready["api_key"].as_str().unwrap();
    assert!(key.starts_with("sk-kml-"));
    // The admin API is there too, with the demo account and its $10.
    let admin_url = ready["admin_url"].as_str().unwrap();
    let wallet: serde_json::Value = http()
        .get(format!(
            "{admin_url}/accounts/{}/wallet",
            ready["account_id"].as_str().unwrap()
        ))
        .bearer_auth(ready["admin_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(wallet["balance_usd"], "10");

    let config = async_openai::config::OpenAIConfig::new()
        .with_api_base(base_url)
        .with_api_key(key);
    let client = async_openai::Client::with_config(config);
    // Models of each simulated provider format answer through the OpenAI SDK.
    let models: Vec<&str> = ready["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for model in ["gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-flash"] {
        assert!(models.contains(&model), "{model} in {models:?}");
        let req = serde_json::from_value(chat_body(model, "demo-nonce", false)).unwrap();
        let reply = client.chat().create(req).await.unwrap();
        assert!(
            reply.choices[0]
                .message
                .content
                .as_deref()
                .unwrap()
                .contains("demo-nonce"),
            "{model}"
        );
    }
    let metrics = http()
        .get(ready["metrics_url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("komilion_requests_total"));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_provider_runs_on_its_own() {
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "mock-provider",
            "--port",
            &port.to_string(),
            "--behavior",
            r#"{"chunks": 3}"#,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let mut reply = None;
    for _ in 0..200 {
        if let Ok(resp) = http()
            .post(&url)
            .json(&chat_body("gpt-4o-mini", "solo", false))
            .send()
            .await
        {
            reply = Some(resp.json::<serde_json::Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let reply = reply.expect("the provider answers");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.matches(' ').count(), 3, "three content pieces: {content}");
    let expected = komilion::metering::tokens::count_text("gpt-4o-mini", content);
    assert_eq!(
        reply["usage"]["completion_tokens"], expected,
        "counted with the real tokenizer"
    );
    assert_eq!(reply["object"], "chat.completion");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A second gateway on a port another one listens on exits with a clear error instead of
/// sharing the port (Pingora's SO_REUSEPORT would let it, and split the traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_demo_refuse_a_port_that_is_taken() {
    let mock = mock_provider(Default::default()).await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let (_dir, path) = write_config(&format!(
        "listen:\n  gateway: [\"127.0.0.1:{}\"]\n  metrics: \"127.0.0.1:{}\"\nproviders: []\n",
        gw.port,
        free_port()
    ));
    let out = Command::new(BIN).args(["serve", "-c"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{} (listen.gateway)", gw.port)),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args([
            "demo",
            "--port",
            &gw.port.to_string(),
            "--metrics-port",
            &free_port().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{}", gw.port)),
        "{stderr}"
    );
    // The first gateway still answers.
    assert_eq!(http_status(gw.metrics_port, "/health"), Some(200));
}

/// `check` warns about an admin listener off loopback (plain HTTP on the network) and a
/// `jwt_auth` without `issuer`/`audience`, and stays quiet once they are fixed.
#[test]
fn check_warns_about_an_exposed_admin_listener_and_an_unscoped_jwt() {
    let config = |admin_host: &str, jwt_extra: &str| {
        format!(
            "providers: []\nstore: \"sqlite:///nonexistent/komilion.db\"\nadmin:\n  listen: \"{admin_host}:9091\"\n  token: \"an-admin-token-of-some-length\"\nplugins:\n  - name: jwt_auth\n    settings:\n      hs256_secret: \"a-shared-secret-of-at-least-32-bytes!!\"\n      max_lifetime_secs: 3600\n{jwt_extra}"
        )
    };
    let check = |text: &str| {
        let (_dir, path) = write_config(text);
        let out = Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stdout}{stderr}");
        let warnings: Vec<String> = stderr
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .map(str::to_owned)
            .collect();
        (stdout, warnings)
    };

    let (stdout, warnings) = check(&config("0.0.0.0", ""));
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    assert!(stdout.contains("ok, 3 warnings"), "{stdout}");
    let admin = &warnings[0];
    assert!(
        admin.contains("admin.listen") && admin.contains("0.0.0.0:9091"),
        "{admin}"
    );
    assert!(admin.contains("bind it to 127.0.0.1:9091"), "{admin}");
    assert!(admin.contains("TLS-terminating reverse proxy"), "{admin}");
    assert!(admin.contains("ssh -L 9091:127.0.0.1:9091"), "{admin}");
    assert!(
        warnings[1].contains("plugins[0].settings.issuer (jwt_auth)"),
        "{}",
        warnings[1]
    );
    assert!(
        warnings[2].contains("plugins[0].settings.audience (jwt_auth)"),
        "{}",
        warnings[2]
    );

    let scoped = "      issuer: \"https://idp.example\"\n      audience: \"komilion\"\n";
    let (stdout, warnings) = check(&config("127.0.0.1", scoped));
    assert_eq!(warnings, Vec::<String>::new());
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");

    // A zero maximum lifetime is an error, with its path.
    let (_dir, path) = write_config(&config("127.0.0.1", scoped).replace("3600", "0"));
    let out = Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plugins[0].settings.max_lifetime_secs"), "{stderr}");
}
