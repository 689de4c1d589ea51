//! Criterion benches of the pieces every request goes through: SSE parsing, JSON handling and
//! the plugin chain. `cargo bench --bench hot_paths`.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use komilion::chain::PluginChain;
use komilion::config::PluginSection;
use komilion::sse::{SseEvent, SseSplitter};
use komilion_sdk::{ChatRequest, Exchange, RequestView, ResponseHead, Surface};
use std::time::Instant;

/// A realistic OpenAI stream: `n` content chunks plus role, finish and [DONE].
fn openai_stream(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-abc\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        )
    };
    out.extend_from_slice(chunk(r#"{"role":"assistant","content":""}"#, "null").as_bytes());
    for i in 0..n {
        out.extend_from_slice(chunk(&format!(r#"{{"content":" token{i}"}}"#), "null").as_bytes());
    }
    out.extend_from_slice(chunk("{}", "\"stop\"").as_bytes());
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

fn sse(c: &mut Criterion) {
    let stream = openai_stream(200);
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    // Network reads rarely line up with events: feed 1 KiB pieces.
    group.bench_function("split+parse 200-chunk stream in 1 KiB reads", |b| {
        b.iter(|| {
            let mut splitter = SseSplitter::new();
            let mut events = 0;
            for piece in stream.chunks(1024) {
                splitter.push(piece);
                splitter.drain(|raw| {
                    let e = SseEvent::parse(&raw);
                    events += e.data.len().min(1);
                    Some(raw)
                });
            }
            events
        })
    });
    group.finish();
}

fn json(c: &mut Criterion) {
    let mut group = c.benchmark_group("chat_request");
    for size in [1_024usize, 100 * 1024, 2 * 1024 * 1024] {
        let body = serde_json::to_vec(&serde_json::json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "q".repeat(size)}],
            "temperature": 0.2
        }))
        .unwrap();
        let body = Bytes::from(body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("parse", size), &body, |b, body| {
            b.iter(|| ChatRequest::parse(body.clone()).unwrap())
        });
        let parsed = ChatRequest::parse(body.clone()).unwrap();
        group.bench_with_input(BenchmarkId::new("rewrite model+usage", size), &parsed, |b, parsed| {
            b.iter(|| {
                let mut r = parsed.clone();
                r.set_upstream_model("gpt-4o");
                r.request_upstream_usage(true);
                r.upstream_body()
            })
        });
    }
    group.finish();
}

fn chain(c: &mut Criterion) {
    let sections: Vec<PluginSection> = serde_yaml::from_str(
        r#"
- name: request_id
- name: static_key_auth
  settings:
    keys:
      - {name: a, key: "sk-kml-aaaaaaaaaaaaaaaaaaaaaaaa"}
      - {name: b, key: "sk-kml-bbbbbbbbbbbbbbbbbbbbbbbb"}
      - {name: c, key: "sk-kml-cccccccccccccccccccccccc"}
"#,
    )
    .unwrap();
    let chain = PluginChain::build(&sections, &komilion_plugins::builtin_registry(), &Default::default()).unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "authorization",
        "Bearer sk-kml-cccccccccccccccccccccccc".parse().unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    let req = RequestView::new(http::Method::POST, "/v1/chat/completions", headers);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    c.bench_function("plugin chain: on_headers + on_response", |b| {
        b.iter(|| {
            let mut ex = Exchange::new(
                "0123456789abcdef0123456789abcdef".into(),
                Surface::OpenAi,
                Instant::now(),
            );
            rt.block_on(chain.on_headers(&req, &mut ex)).unwrap();
            let mut head = ResponseHead::new(200);
            chain.on_response(&mut head, &ex);
            head
        })
    });
}

/// `key_auth` with a warm cache: the cost every request pays to authenticate (target ≤ 2 µs).
fn warm_key_auth(c: &mut Criterion) {
    use komilion::admin::ops;
    use komilion::store::cache::StoreCache;
    use komilion_plugins::key_auth::{KeyAuth, KeyAuthSettings};
    use komilion_sdk::Plugin;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let (cache, secret) = rt.block_on(async {
        let store = komilion::store::open(&url).await.unwrap();
        let account = ops::create_account(
            store.as_ref(),
            ops::CreateAccount {
                name: "b".into(),
                email: "b@example.com".into(),
            },
        )
        .await
        .unwrap();
        let key = ops::create_key(
            store.as_ref(),
            account["id"].as_str().unwrap(),
            ops::CreateKey {
                name: "k".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let slot: komilion::store::cache::StoreSlot = Default::default();
        let _ = slot.set(store);
        (StoreCache::new(slot), key["key"].as_str().unwrap().to_owned())
    });
    let plugin = KeyAuth::new(cache, KeyAuthSettings::default());
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let req = RequestView::new(http::Method::POST, "/v1/chat/completions", headers);
    let run = || async {
        let mut ex = Exchange::new(String::new(), Surface::OpenAi, Instant::now());
        let flow = plugin.on_headers(&req, &mut ex).await;
        assert!(ex.principal.is_some());
        flow
    };
    rt.block_on(run());
    c.bench_function("key_auth with a warm cache", |b| b.to_async(&rt).iter(run));
}

/// The metering path: every event of a stream through the relay's meter (usage requested for
/// the gateway, so `"usage":null` is cut from each chunk and the usage chunk dropped), then per
/// request the cost and the usage record appended to the spool.
fn metering(c: &mut Criterion) {
    use komilion::metering::stream::{Inspected, StreamMeter};
    fn inspected(i: Inspected) -> Option<bytes::Bytes> {
        match i {
            Inspected::Send(b) => Some(b),
            _ => None,
        }
    }
    use komilion::usage::spool::UsageSpool;
    use komilion::usage::UsageRecord;
    let with_usage = |n: usize| -> Vec<u8> {
        let mut s = String::from_utf8(openai_stream(n)).unwrap();
        s = s.replace("]}\n\n", "],\"usage\":null}\n\n");
        let usage = "data: {\"id\":\"chatcmpl-abc\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":200,\"total_tokens\":212}}\n\n";
        s = s.replace("data: [DONE]", &format!("{usage}data: [DONE]"));
        s.into_bytes()
    };
    let stream = with_usage(200);
    let events = 200 + 4;
    let mut group = c.benchmark_group("metering");
    group.throughput(Throughput::Elements(events));
    group.bench_function("relay + meter, per event (200-chunk stream)", |b| {
        b.iter(|| {
            let mut splitter = SseSplitter::new();
            let mut meter = StreamMeter::new(true, "gpt-4o-mini");
            let mut out = 0;
            for piece in stream.chunks(1024) {
                splitter.push(piece);
                out += splitter
                    .drain(|raw| inspected(meter.inspect(raw)))
                    .map_or(0, |b| b.len());
            }
            assert!(meter.usage.is_some());
            out
        })
    });
    group.finish();

    let dir = tempfile::tempdir().unwrap();
    let spool = UsageSpool::open(dir.path(), komilion::usage::spool::SpoolMode::Exclusive).unwrap();
    let small = with_usage(10);
    let price = komilion::catalog::ModelPrice {
        cached_input: 75_000_000,
        ..komilion::catalog::ModelPrice::flat(150_000_000, 600_000_000)
    };
    c.bench_function("metering: per request (11-event stream, cost, spool append)", |b| {
        b.iter(|| {
            let mut splitter = SseSplitter::new();
            let mut meter = StreamMeter::new(true, "gpt-4o-mini");
            splitter.push(&small);
            splitter.drain(|raw| inspected(meter.inspect(raw)));
            let usage = meter.usage.unwrap();
            let record = UsageRecord {
                request_id: "01a2236881259367b78ea2db760d6dba".into(),
                account_id: "acct_0123456789abcdef01234567".into(),
                key_id: Some("key_0123456789abcdef01234567".into()),
                created_at: chrono::Utc::now(),
                route: "chat_completions".into(),
                requested_model: Some("gpt-4o-mini".into()),
                routed_model: Some("gpt-4o-mini".into()),
                provider: Some("openai".into()),
                task: None,
                status: 200,
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cached_tokens: 0,
                reasoning_tokens: 0,
                cost_nano_usd: komilion::metering::cost(&price, &usage),
                unbilled_nano_usd: 0,
                estimated: false,
                latency_ms: 120,
                ttfb_ms: Some(40),
                cache_hit: false,
                lease_id: Some("lease_0123456789abcdef01234567".into()),
                end_user: None,
            };
            spool.append(&record).unwrap();
        })
    });
}

/// Counting a 2 MB prompt (a client that hangs up before usage, a tight wallet): the whole
/// text through the tokenizer, as before bounded counting, against today's samples.
fn big_prompt(c: &mut Criterion) {
    let text = ("Lorem".to_owned() + &"x".repeat(995) + " ").repeat(2000);
    let messages = [komilion_sdk::ChatMessage {
        role: "user".into(),
        text: text.clone(),
    }];
    let mut group = c.benchmark_group("2 MB prompt token count");
    group.sample_size(10);
    group.bench_function("whole text (before)", |b| {
        b.iter(|| {
            komilion::metering::tokens::encoding_for("gpt-4o-mini")
                .encode_ordinary(&text)
                .len()
        })
    });
    group.bench_function("bounded samples (now)", |b| {
        b.iter(|| komilion::metering::tokens::count_chat_prompt("gpt-4o-mini", &messages))
    });
    group.finish();
}

/// An Anthropic Messages stream of `n` text deltas, as the API sends it.
fn anthropic_stream(n: usize) -> Vec<u8> {
    let mut out = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
         event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    for i in 0..n {
        out.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" token{i}\"}}}}\n\n"
        ));
    }
    out.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
         event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":200}}\n\n\
         event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    out.into_bytes()
}

/// A Gemini stream of `n` text chunks, as the API sends it (`alt=sse`).
fn gemini_stream(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let finish = if i + 1 == n { r#","finishReason": "STOP""# } else { "" };
        out.push_str(&format!(
            "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \" token{i}\"}}],\"role\": \"model\"}}{finish},\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 25,\"candidatesTokenCount\": {i},\"totalTokenCount\": 30}},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}}\r\n\r\n"
        ));
    }
    out.into_bytes()
}

/// What crossing formats costs: a request translated, a whole answer translated back, and a
/// stream translated event by event (OpenAI in and out is a splice and pays none of this).
fn translation(c: &mut Criterion) {
    use komilion::formats::openai_chat;
    use komilion::providers::translate::StreamTranslator;
    use komilion::providers::{anthropic::Anthropic, gemini::Gemini, ProviderAdapter};
    let request = serde_json::to_vec(&serde_json::json!({
        "model": "m", "max_tokens": 500, "stream": true,
        "messages": [{"role": "system", "content": "You are helpful."},
                     {"role": "user", "content": "q".repeat(1024)}],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object",
            "properties": {"q": {"type": "string"}}}}}]
    }))
    .unwrap();
    let mut group = c.benchmark_group("translation");
    for (name, adapter) in [
        ("anthropic", &Anthropic as &dyn ProviderAdapter),
        ("gemini", &Gemini as &dyn ProviderAdapter),
    ] {
        group.bench_function(format!("OpenAI request (1 KiB prompt) -> {name}"), |b| {
            b.iter(|| {
                let canonical = openai_chat::decode_request(&request).unwrap();
                adapter.encode_request(&canonical, "m").unwrap()
            })
        });
    }
    let answer = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello there, how can I help you today? I can look things up."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":15}}"#;
    group.bench_function("anthropic answer -> OpenAI answer", |b| {
        b.iter(|| {
            let decoded = Anthropic.decode_answer(answer).unwrap();
            openai_chat::encode_answer(&decoded, "claude-sonnet-4-5", 1_700_000_000)
        })
    });
    for (name, adapter, stream) in [
        ("anthropic", &Anthropic as &dyn ProviderAdapter, anthropic_stream(200)),
        ("gemini", &Gemini as &dyn ProviderAdapter, gemini_stream(200)),
    ] {
        group.throughput(Throughput::Elements(200));
        group.bench_function(
            format!("{name} stream -> OpenAI chunks, 200 events in 1 KiB reads"),
            |b| {
                b.iter(|| {
                    let mut t = StreamTranslator::new(adapter, "m", 1_700_000_000, 4 << 20);
                    let mut bytes = 0;
                    for piece in stream.chunks(1024) {
                        bytes += t.feed(piece).unwrap().len();
                    }
                    bytes + t.finish().unwrap().len()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    sse,
    json,
    chain,
    warm_key_auth,
    metering,
    big_prompt,
    translation
);
criterion_main!(benches);
