#![allow(clippy::unwrap_used)]
//! Slow and greedy clients: heads that never end, heads sent a byte at a time, idle kept-alive
//! connections and too many connections are cut off by the `limits` section, while a normal
//! client keeps being served.

mod common;

use common::*;
use komilion::mock_provider::Behavior;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a test waits for the gateway to close a connection: far below Pingora's 60 s per
/// read, which is what kept these connections open, and far above any deadline set here.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

/// Connect to a listener of the gateway.
async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// Read until the gateway closes the connection (or `CLOSE_BOUND` passes): what was read and
/// whether the connection closed.
async fn until_closed(s: &mut (impl AsyncRead + Unpin)) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(CLOSE_BOUND, s.read_to_end(&mut out)).await.is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The status and the OpenAI error code of one of the edge's own answers.
fn status_and_code(answer: &str) -> (u16, String) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

/// A connection watched by [`until_closed`] (closed, after how long, what it was told) was cut
/// with a 408 at `deadline`: not before it, and not long after it (the margin only absorbs a
/// loaded machine).
fn assert_cut_at((closed, after, answer): (bool, Duration, String), deadline: Duration, what: &str) {
    assert!(closed, "{what} was still open after {CLOSE_BOUND:?}");
    assert!(
        after >= deadline - Duration::from_millis(100) && after < deadline + Duration::from_secs(5),
        "{what}: closed after {after:?}, deadline {deadline:?}"
    );
    assert_eq!(status_and_code(&answer), (408, "request_timeout".into()), "{answer}");
}

/// One response of a kept-alive connection: its status (the body, framed by its length, is read
/// and dropped).
async fn read_response(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "the connection closed mid-head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn gateway(mock: &komilion::mock_provider::MockProvider, limits: &str) -> GatewayProcess {
    GatewayProcess::start(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &format!("limits:\n{limits}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_half_sent_heads_are_closed_at_the_deadline_while_a_client_is_served() {
    let mock = mock_provider(Behavior::default()).await;
    let deadline = Duration::from_millis(1500);
    let gw = gateway(&mock, "  request_head_timeout_ms: 1500\n");

    // A normal client, served throughout.
    let done = Arc::new(AtomicBool::new(false));
    let client = {
        let done = done.clone();
        let url = gw.url("/v1/chat/completions");
        tokio::spawn(async move {
            let http = http();
            let mut served = 0;
            while !done.load(Ordering::Relaxed) {
                let resp = http
                    .post(&url)
                    .bearer_auth(CLIENT_KEY)
                    .json(&chat_body("gpt-4o-mini", "hello", false))
                    .send()
                    .await
                    .expect("the gateway answers while 300 heads hang");
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap();
                served += 1;
            }
            served
        })
    };

    let mut halves = Vec::new();
    for _ in 0..300 {
        let mut s = connect(gw.port).await;
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let sent = Instant::now();
        halves.push(tokio::spawn(async move {
            let (answer, closed) = until_closed(&mut s).await;
            (closed, sent.elapsed(), answer)
        }));
    }
    for half in halves {
        let (closed, after, answer) = half.await.unwrap();
        assert!(closed, "a half-sent head was still open after {CLOSE_BOUND:?}");
        // The deadline runs from the accept, just before the bytes were sent; the margin only
        // absorbs a loaded machine.
        assert!(
            after < deadline + Duration::from_secs(5),
            "closed after {after:?}, deadline {deadline:?}"
        );
        assert_eq!(status_and_code(&answer), (408, "request_timeout".into()), "{answer}");
    }
    done.store(true, Ordering::Relaxed);
    let served = client.await.unwrap();
    assert!(served >= 1, "the normal client was served {served} times");
    gw.metric_until("komilion_client_timeouts_total{phase=\"head\"}", |v| v >= 300.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_a_second_is_cut_at_the_deadline() {
    let mock = mock_provider(Behavior::default()).await;
    let deadline = Duration::from_millis(2500);
    let gw = gateway(&mock, "  request_head_timeout_ms: 2500\n");

    let (mut read, mut write) = connect(gw.port).await.into_split();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let (answer, closed) = until_closed(&mut read).await;
        (closed, started.elapsed(), answer)
    });
    // Each byte comes well within Pingora's 60 s per read; only a deadline for the whole head
    // stops this client. The pause is the client's pace, not a wait for the gateway.
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n\r\n");
    for byte in head.bytes() {
        if reader.is_finished() || write.write_all(&[byte]).await.is_err() || started.elapsed() > CLOSE_BOUND {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_cut_at(reader.await.unwrap(), deadline, "a byte-a-second head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_their_timeouts() {
    let mock = mock_provider(Behavior::default()).await;
    let idle = Duration::from_millis(1000);
    let head_deadline = Duration::from_millis(2000);
    let gw = gateway(&mock, "  idle_keepalive_ms: 1000\n  request_head_timeout_ms: 2000\n");
    let request = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n\r\n");

    // A kept-alive connection serves requests in a row, then is closed once idle.
    let mut s = connect(gw.port).await;
    for _ in 0..2 {
        s.write_all(request.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut s).await, 200);
    }
    let answered = Instant::now();
    let (rest, closed) = until_closed(&mut s).await;
    let after = answered.elapsed();
    assert!(
        closed,
        "an idle kept-alive connection was still open after {CLOSE_BOUND:?}"
    );
    assert_eq!(rest, "", "an idle connection is closed without a word");
    assert!(
        after >= idle - Duration::from_millis(100) && after < idle + Duration::from_secs(5),
        "closed after {after:?}, idle timeout {idle:?}"
    );
    gw.metric_until("komilion_client_timeouts_total{phase=\"idle\"}", |v| v >= 1.0)
        .await;

    // A new connection that never sends a byte has the head deadline.
    let opened = Instant::now();
    let mut s = connect(gw.port).await;
    let (rest, closed) = until_closed(&mut s).await;
    let after = opened.elapsed();
    assert!(closed && rest.is_empty(), "closed: {closed}, read: {rest:?}");
    assert!(
        after >= head_deadline - Duration::from_millis(100) && after < head_deadline + Duration::from_secs(5),
        "closed after {after:?}, head deadline {head_deadline:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_refuses_the_next_connection_and_recovers() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = gateway(
        &mock,
        "  max_connections_per_listener: 4\n  request_head_timeout_ms: 60000\n",
    );
    let open = format!("komilion_connections_open{{listener=\"127.0.0.1:{}\"}}", gw.port);

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(gw.port).await);
    }
    gw.metric_until(&open, |v| v == 4.0).await;

    // The fifth is answered 503 at once, before it sends anything, and closed.
    let mut fifth = connect(gw.port).await;
    let (answer, closed) = until_closed(&mut fifth).await;
    assert!(closed, "the connection over the cap was left open");
    assert_eq!(
        status_and_code(&answer),
        (503, "too_many_connections".into()),
        "{answer}"
    );
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    gw.metric_until(
        &format!(
            "komilion_connections_refused_total{{listener=\"127.0.0.1:{}\"}}",
            gw.port
        ),
        |v| v >= 1.0,
    )
    .await;

    // Once the held connections go, the listener serves again.
    drop(held);
    gw.metric_until(&open, |v| v == 0.0).await;
    let (status, body, _) = chat(&gw, CLIENT_KEY, "gpt-4o-mini").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_past_its_deadline_gets_408() {
    let mock = mock_provider(Behavior::default()).await;
    let deadline = Duration::from_millis(1500);
    let gw = gateway(&mock, "  body_timeout_ms: 1500\n");

    let (mut read, mut write) = connect(gw.port).await.into_split();
    write
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Length: 1000\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let (answer, closed) = until_closed(&mut read).await;
        (closed, started.elapsed(), answer)
    });
    // A byte every 200 ms: each read is quick, the whole body is not.
    while !reader.is_finished() && started.elapsed() < CLOSE_BOUND {
        if write.write_all(b" ").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_cut_at(reader.await.unwrap(), deadline, "a trickled body");
    gw.metric_until("komilion_client_timeouts_total{phase=\"body\"}", |v| v >= 1.0)
        .await;
}
