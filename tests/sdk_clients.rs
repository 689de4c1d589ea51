#![allow(clippy::unwrap_used)]
//! The official Python SDKs (Anthropic's and OpenAI's, versions pinned in
//! `tests/sdk/requirements.txt`, installed by `scripts/test`) against the real binary, each
//! surface served by each provider format.

mod common;

use common::*;
use komilion::mock_provider::Behavior;
use std::process::Command;

/// Run one SDK script; its output is shown when it fails.
fn run_sdk(script: &str, gw: &GatewayProcess, model: &str, failing: &str) {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(&path)
        .arg(format!("http://127.0.0.1:{}", gw.port))
        .arg(CLIENT_KEY)
        .arg(model)
        .arg(failing)
        .output()
        .expect("python3 runs (scripts/test installs the SDKs)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "{script} {model}:\n{stdout}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_work_against_every_provider_format() {
    let mock = mock_provider(Behavior::default()).await;
    let failing = mock_provider(Behavior {
        fail_status: Some(429),
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(
        &[
            ProviderSpec::new("claude", mock.base_url(), &["claude-sonnet-4-5"]).of_kind("anthropic"),
            ProviderSpec::new("compatible", mock.base_url(), &["gpt-4o-mini"]),
            ProviderSpec::new("overloaded", failing.base_url(), &["claude-haiku-4-5"]).of_kind("anthropic"),
            ProviderSpec::new("limited", failing.base_url(), &["gpt-4.1-nano"]),
            ProviderSpec::new(
                "google",
                format!("http://{}/v1beta", mock.addr()),
                &["gemini-2.5-flash"],
            )
            .of_kind("gemini"),
        ],
        "",
    );
    // Each SDK against the format it was made for and against the other one.
    let gw_ref = &gw;
    tokio::task::block_in_place(|| {
        run_sdk("anthropic_sdk.py", gw_ref, "claude-sonnet-4-5", "claude-haiku-4-5");
        run_sdk("anthropic_sdk.py", gw_ref, "gpt-4o-mini", "gpt-4.1-nano");
        run_sdk("openai_sdk.py", gw_ref, "claude-sonnet-4-5", "claude-haiku-4-5");
        run_sdk("anthropic_sdk.py", gw_ref, "gemini-2.5-flash", "claude-haiku-4-5");
        run_sdk("openai_sdk.py", gw_ref, "gemini-2.5-flash", "gpt-4.1-nano");
    });
}
