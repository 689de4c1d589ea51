//! Embeddings: OpenAI's `POST /v1/embeddings` (and Azure's deployment of it) on the wire, and
//! the vectors every embedding route (Gemini's and Cohere's too) answers with.
//!
//! A vector is made from a hash of its input text alone, so the same text always gets the same
//! vector (whatever the route or the model), different texts different ones, and a shorter
//! vector is the start of the longer one made unit length again, as OpenAI's `dimensions`
//! shortens its `text-embedding-3` vectors. Every vector has unit length. Token ids given as
//! input are decoded with the model's tokenizer first, so they embed as their text does.
//!
//! Shapes follow OpenAI's API reference (the embedding object, `encoding_format: "base64"` as
//! the little-endian `float32` bytes in base64); prompt tokens are counted with the model's
//! tokenizer ([`count_text`], which falls back to `cl100k_base`).

use super::openai::to_json;
use super::{behavior_for, write_simple, Head, Keep, ReplyHeaders, State, Surface};
use crate::metering::tokens::{count_text, encoding_for};
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};
use std::io;
use std::time::Duration;
use tokio::net::TcpStream;

/// The most inputs OpenAI embeds in one request.
const MAX_INPUTS: usize = 2048;
/// The most tokens of one input OpenAI's embedding models take.
const MAX_INPUT_TOKENS: u64 = 8192;

/// FNV-1a (64 bits): the same on every build, which std's hasher does not promise.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A unit vector of `dims` values for `text`: the same every time, and the first `dims` of a
/// longer one made unit length again.
pub fn vector(text: &str, dims: usize) -> Vec<f32> {
    // SplitMix64 from the text's hash: uniform values in [-1, 1).
    let mut state = fnv1a(text.as_bytes());
    let raw: Vec<f64> = (0..dims)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    raw.iter()
        .map(|x| if norm > 0.0 { (x / norm) as f32 } else { 0.0 })
        .collect()
}

/// The vector's `float32` values, little-endian, in standard base64 (OpenAI's
/// `encoding_format: "base64"`, Cohere's `base64` type).
pub fn base64_floats(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The length of an OpenAI embedding model's vectors.
pub fn openai_dimensions(model: &str) -> usize {
    if model.contains("-large") {
        3072
    } else {
        1536
    }
}

/// One embedding in OpenAI's list.
#[derive(Serialize)]
struct Item {
    object: &'static str,
    index: usize,
    embedding: Encoded,
}

/// `float32` values are written as `f32`s (their shortest text), not widened to `f64`.
#[derive(Serialize)]
#[serde(untagged)]
enum Encoded {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct List<'a> {
    object: &'static str,
    data: Vec<Item>,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// `v` as JSON, pretty or compact (`f32`s kept as written by the struct).
pub(super) fn serialize<T: Serialize>(v: &T, pretty: bool) -> Vec<u8> {
    let out = if pretty {
        serde_json::to_vec_pretty(v)
    } else {
        serde_json::to_vec(v)
    };
    out.unwrap_or_default()
}

/// OpenAI's 400 for an embeddings request it refuses.
fn refusal(message: &str, param: Option<&str>, pretty: bool) -> Vec<u8> {
    to_json(
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}}),
        pretty,
    )
}

/// What OpenAI says of an `input` it cannot read (empty, or of the wrong type).
const BAD_INPUT: &str =
    "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.";

/// An embeddings request, read.
struct Batch {
    /// The text of each input (token ids decoded).
    texts: Vec<String>,
    tokens: u64,
    dims: usize,
    base64: bool,
}

/// Read `request` for `model`, or say (message, param) why OpenAI would refuse it.
fn read(request: &Value, model: &str) -> Result<Batch, (String, Option<&'static str>)> {
    let bad_input = || (BAD_INPUT.to_owned(), None);
    let bpe = encoding_for(model);
    let decode = |ids: &[Value]| -> Option<(String, u64)> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect::<Option<_>>()?;
        if ids.is_empty() {
            return None;
        }
        Some((bpe.decode(&ids).ok()?, ids.len() as u64))
    };
    // Each input's text and tokens.
    let inputs: Vec<(String, u64)> = match &request["input"] {
        Value::String(s) if !s.is_empty() => vec![(s.clone(), count_text(model, s))],
        Value::Array(items) if items.iter().all(Value::is_string) && !items.is_empty() => items
            .iter()
            .map(|s| match s.as_str() {
                Some(s) if !s.is_empty() => Ok((s.to_owned(), count_text(model, s))),
                _ => Err(bad_input()),
            })
            .collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => vec![decode(items).ok_or_else(bad_input)?],
        Value::Array(items) if items.iter().all(Value::is_array) && !items.is_empty() => items
            .iter()
            .map(|ids| decode(ids.as_array().map_or(&[][..], Vec::as_slice)).ok_or_else(bad_input))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad_input()),
    };
    if inputs.len() > MAX_INPUTS {
        let message = format!("'$.input' is invalid: at most {MAX_INPUTS} inputs may be embedded in one request.");
        return Err((message, Some("input")));
    }
    if let Some((_, too_long)) = inputs.iter().find(|(_, tokens)| *tokens > MAX_INPUT_TOKENS) {
        let message = format!(
            "This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however you requested {too_long} \
             tokens ({too_long} in your prompt; 0 for the completion). Please reduce your prompt; or completion length."
        );
        return Err((message, None));
    }
    let base64 = match &request["encoding_format"] {
        Value::Null => false,
        Value::String(f) if f == "float" => false,
        Value::String(f) if f == "base64" => true,
        other => {
            let message =
                format!("Invalid value for 'encoding_format': {other}. Supported values are: 'float' and 'base64'.");
            return Err((message, Some("encoding_format")));
        }
    };
    let native = openai_dimensions(model);
    let dims = match &request["dimensions"] {
        Value::Null => native,
        _ if model.contains("ada-002") => {
            return Err(("This model does not support specifying dimensions.".to_owned(), None))
        }
        v => match v.as_u64() {
            Some(d) if (1..=native as u64).contains(&d) => d as usize,
            _ => {
                let message = format!("Invalid value for 'dimensions' = {v}. Must be between 1 and {native}.");
                return Err((message, Some("dimensions")));
            }
        },
    };
    let tokens = inputs.iter().map(|(_, t)| t).sum();
    Ok(Batch {
        texts: inputs.into_iter().map(|(text, _)| text).collect(),
        tokens,
        dims,
        base64,
    })
}

/// `POST /v1/embeddings` (OpenAI) and `.../deployments/{d}/embeddings` (Azure).
pub(super) async fn openai(
    stream: &mut TcpStream,
    state: &State,
    head: &Head,
    body: &[u8],
    mut headers: ReplyHeaders,
    surface: Surface<'_>,
) -> io::Result<Keep> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        let body = surface.error_body(400, state.config.behavior.pretty);
        return write_simple(stream, 400, "application/json", &body, &headers).await;
    };
    let behavior = match behavior_for(state, head, &request) {
        Ok(b) => b,
        Err(message) => {
            let body = refusal(&message, Some("mock"), state.config.behavior.pretty);
            return write_simple(stream, 400, "application/json", &body, &headers).await;
        }
    };
    if behavior.ttfb_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.ttfb_ms)).await;
    }
    if let Some(status) = behavior.fail_status {
        let body = surface.error_body(status, behavior.pretty);
        return write_simple(stream, status, "application/json", &body, &headers).await;
    }
    if matches!(surface, Surface::OpenAi) && request["model"].as_str().is_none_or(str::is_empty) {
        let body = refusal("you must provide a model parameter", None, behavior.pretty);
        return write_simple(stream, 400, "application/json", &body, &headers).await;
    }
    let model = surface.model(&request);
    let batch = match read(&request, &model) {
        Ok(batch) => batch,
        Err((message, param)) => {
            let body = refusal(&message, param, behavior.pretty);
            return write_simple(stream, 400, "application/json", &body, &headers).await;
        }
    };
    headers.tokens = batch.tokens;
    let data = batch
        .texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let values = vector(text, batch.dims);
            Item {
                object: "embedding",
                index,
                embedding: if batch.base64 {
                    Encoded::Base64(base64_floats(&values))
                } else {
                    Encoded::Float(values)
                },
            }
        })
        .collect();
    let list = List {
        object: "list",
        data,
        model: &model,
        usage: (!behavior.omit_usage).then_some(Usage {
            prompt_tokens: batch.tokens,
            total_tokens: batch.tokens,
        }),
    };
    let body = serialize(&list, behavior.pretty);
    write_simple(stream, 200, "application/json", &body, &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_provider::{Behavior, MockConfig, MockProvider};
    use std::net::SocketAddr;

    async fn start(api_key: Option<&str>) -> MockProvider {
        let config = MockConfig {
            api_key: api_key.map(str::to_owned),
            behavior: Behavior::default(),
            ..MockConfig::default()
        };
        MockProvider::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap()
    }

    async fn embed(mock: &MockProvider, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/embeddings", mock.base_url()))
            .bearer_auth("sk-test")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    fn floats(v: &Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
    }

    #[test]
    fn vectors_are_unit_deterministic_and_shorten_as_prefixes() {
        let a = vector("hello world", 1536);
        assert_eq!(a.len(), 1536);
        assert!((norm(&a) - 1.0).abs() < 1e-5, "{}", norm(&a));
        assert_eq!(a, vector("hello world", 1536));
        assert_ne!(a, vector("hello world!", 1536));
        let short = vector("hello world", 256);
        let cut = &a[..256];
        let scale = norm(cut);
        for (s, c) in short.iter().zip(cut) {
            assert!((f64::from(*s) - f64::from(*c) / scale).abs() < 1e-5);
        }
        assert!(vector("x", 0).is_empty());
    }

    #[tokio::test]
    async fn a_list_of_unit_vectors_with_usage() {
        let mock = start(Some("sk-test")).await;
        let resp = embed(
            &mock,
            json!({"model": "text-embedding-3-small", "input": ["The food was delicious", "hi"]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("x-request-id").is_some());
        let raw = resp.text().await.unwrap();
        assert!(
            raw.starts_with("{\"object\":\"list\",\"data\":[{\"object\":\"embedding\",\"index\":0,\"embedding\":["),
            "{}",
            &raw[..80]
        );
        let v: Value = serde_json::from_str(&raw).unwrap();
        let model = "text-embedding-3-small";
        let tokens = count_text(model, "The food was delicious") + count_text(model, "hi");
        assert_eq!(v["model"], model);
        assert_eq!(v["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}));
        let first = floats(&v["data"][0]["embedding"]);
        assert_eq!(first.len(), 1536);
        assert!((norm(&first) - 1.0).abs() < 1e-5);
        assert_eq!(
            first,
            vector("The food was delicious", 1536),
            "the f32s survive the JSON"
        );
        assert_eq!(v["data"][1]["index"], 1);

        // The same text embeds alike whatever its neighbours; large models are longer;
        // `dimensions` shortens.
        let v: Value = embed(&mock, json!({"model": "text-embedding-3-large", "input": "hi"}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(floats(&v["data"][0]["embedding"]).len(), 3072);
        let again: Value = embed(
            &mock,
            json!({"model": "text-embedding-3-small", "input": "hi", "dimensions": 256}),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(floats(&again["data"][0]["embedding"]), vector("hi", 256));

        // Token ids embed as their text does.
        let ids: Vec<u32> = encoding_for(model).encode_ordinary("hi there");
        let by_ids: Value = embed(&mock, json!({"model": model, "input": [ids.clone()]}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(floats(&by_ids["data"][0]["embedding"]), vector("hi there", 1536));
        assert_eq!(by_ids["usage"]["prompt_tokens"], ids.len());
    }

    #[tokio::test]
    async fn base64_is_the_little_endian_floats() {
        let mock = start(None).await;
        let v: Value = embed(
            &mock,
            json!({"model": "text-embedding-3-small", "input": "hi", "encoding_format": "base64", "dimensions": 8}),
        )
        .await
        .json()
        .await
        .unwrap();
        let text = v["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
        assert_eq!(bytes.len(), 8 * 4);
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(decoded, vector("hi", 8));
    }

    #[tokio::test]
    async fn refusals_are_openais() {
        let mock = start(Some("sk-test")).await;
        for input in [json!(""), json!([]), json!(["ok", ""]), json!(3), Value::Null] {
            let resp = embed(&mock, json!({"model": "text-embedding-3-small", "input": input})).await;
            assert_eq!(resp.status(), 400, "{input}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert_eq!(v["error"]["message"], BAD_INPUT);
        }
        let resp = embed(
            &mock,
            json!({"model": "text-embedding-ada-002", "input": "hi", "dimensions": 8}),
        )
        .await;
        assert_eq!(resp.status(), 400);
        let resp = embed(
            &mock,
            json!({"model": "text-embedding-3-small", "input": "hi", "dimensions": 2000}),
        )
        .await;
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "dimensions");
        let resp = embed(
            &mock,
            json!({"model": "text-embedding-3-small", "input": "hi", "mock": {"fail_status": 429}}),
        )
        .await;
        assert_eq!(resp.status(), 429);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        let resp = reqwest::Client::new()
            .post(format!("{}/embeddings", mock.base_url()))
            .json(&json!({"model": "text-embedding-3-small", "input": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }

    #[tokio::test]
    async fn azure_deployments_embed_too() {
        let mock = start(Some("k")).await;
        let resp = reqwest::Client::new()
            .post(format!(
                "http://{}/openai/deployments/emb/embeddings?api-version=2024-10-21",
                mock.addr()
            ))
            .header("api-key", "k")
            .json(&json!({"input": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("apim-request-id").is_some());
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["model"], "emb");
        assert_eq!(floats(&v["data"][0]["embedding"]), vector("hi", 1536));
    }
}
