#![allow(clippy::unwrap_used)]
//! Clients' features through the gateway: the official client drives tools (whole and
//! streamed), `n`, JSON mode, `max_tokens`, `stop` and `logprobs` against the simulated
//! provider, which answers them as OpenAI does.

mod common;

use async_openai::config::OpenAIConfig;
use async_openai::types::{CreateChatCompletionRequest, CreateChatCompletionStreamResponse, FinishReason};
use common::*;
use futures::StreamExt;
use komilion::metering::tokens::count_text;
use komilion::mock_provider::{Behavior, MockProvider};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const MODEL: &str = "gpt-4o-mini";
/// Longest wait for any one answer: generous, the machine is shared.
const DEADLINE: Duration = Duration::from_secs(60);

/// A gateway in front of a simulated provider, and the official client pointed at it.
struct Setup {
    _mock: MockProvider,
    _gw: GatewayProcess,
    client: async_openai::Client<OpenAIConfig>,
}

async fn setup(behavior: Behavior) -> Setup {
    let mock = mock_provider(behavior).await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &[MODEL])], "");
    let client = openai_client(&gw, CLIENT_KEY);
    Setup {
        _mock: mock,
        _gw: gw,
        client,
    }
}

/// A request for one user message, with `extra` fields, as the client library types it.
fn request(content: &str, extra: Value) -> CreateChatCompletionRequest {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    serde_json::from_value(body).unwrap()
}

impl Setup {
    async fn create(&self, req: CreateChatCompletionRequest) -> async_openai::types::CreateChatCompletionResponse {
        tokio::time::timeout(DEADLINE, self.client.chat().create(req))
            .await
            .expect("an answer in time")
            .unwrap()
    }

    async fn stream(&self, mut req: CreateChatCompletionRequest) -> Vec<CreateChatCompletionStreamResponse> {
        req.stream = Some(true);
        let collect = async {
            let stream = self.client.chat().create_stream(req).await.unwrap();
            stream.map(|chunk| chunk.unwrap()).collect::<Vec<_>>().await
        };
        tokio::time::timeout(DEADLINE, collect)
            .await
            .expect("the stream ends in time")
    }
}

/// Each choice's streamed content, joined, by choice index.
fn streamed_content(chunks: &[CreateChatCompletionStreamResponse]) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for choice in chunks.iter().flat_map(|c| &c.choices) {
        let text: &mut String = out.entry(choice.index).or_default();
        text.push_str(choice.delta.content.as_deref().unwrap_or(""));
    }
    out
}

/// Each choice's finish reason.
fn finish_reasons(chunks: &[CreateChatCompletionStreamResponse]) -> BTreeMap<u32, FinishReason> {
    chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| Some((c.index, c.finish_reason?)))
        .collect()
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1}
            },
            "required": ["city", "unit", "days"]
        }
    }}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_answer_with_a_tool_call() {
    let s = setup(Behavior::default()).await;
    let reply = s
        .create(request("weather in Paris?", json!({"tools": weather_tool()})))
        .await;
    let choice = &reply.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    assert_eq!(choice.message.content, None);
    let calls = choice.message.tool_calls.as_ref().unwrap();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].id.starts_with("call_"), "{}", calls[0].id);
    assert_eq!(calls[0].function.name, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert_eq!(args["unit"], "celsius");
    assert!(args["days"].as_i64().unwrap() >= 1, "{args}");
    // The output the gateway would meter: the call's name and arguments.
    let name_and_args = format!("get_weather{}", calls[0].function.arguments);
    assert_eq!(
        reply.usage.unwrap().completion_tokens as u64,
        count_text(MODEL, &name_and_args)
    );

    // A named tool is called; `none` gets text.
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let reply = s
        .create(request("x", json!({"tools": weather_tool(), "tool_choice": named})))
        .await;
    assert_eq!(reply.choices[0].finish_reason, Some(FinishReason::ToolCalls));
    let reply = s
        .create(request("x", json!({"tools": weather_tool(), "tool_choice": "none"})))
        .await;
    assert_eq!(reply.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(reply.choices[0]
        .message
        .content
        .as_ref()
        .unwrap()
        .starts_with("Echo: x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_reassemble_from_their_deltas() {
    let s = setup(Behavior::default()).await;
    let chunks = s
        .stream(request(
            "weather?",
            json!({"tools": weather_tool(), "tool_choice": "required"}),
        ))
        .await;
    // Reassemble as clients do: the first delta of a call has its id and name, the rest
    // append to its arguments.
    let mut calls: BTreeMap<u32, (String, String, String)> = BTreeMap::new();
    let mut fragments = 0;
    for choice in chunks.iter().flat_map(|c| &c.choices) {
        assert_eq!(choice.index, 0);
        for call in choice.delta.tool_calls.iter().flatten() {
            let entry = calls.entry(call.index).or_default();
            if let Some(id) = &call.id {
                entry.0 = id.clone();
            }
            if let Some(f) = &call.function {
                if let Some(name) = &f.name {
                    entry.1 = name.clone();
                }
                if let Some(args) = &f.arguments {
                    fragments += usize::from(!args.is_empty());
                    entry.2.push_str(args);
                }
            }
        }
    }
    assert_eq!(calls.len(), 1, "{chunks:?}");
    let (id, name, arguments) = &calls[&0];
    assert!(id.starts_with("call_"));
    assert_eq!(name, "get_weather");
    assert!(fragments > 1, "the arguments came in pieces");
    let args: Value = serde_json::from_str(arguments).unwrap();
    assert!(args["city"].is_string() && args["days"].is_i64(), "{args}");
    assert_eq!(finish_reasons(&chunks)[&0], FinishReason::ToolCalls);
    assert!(
        chunks.iter().all(|c| c.usage.is_none() && !c.choices.is_empty()),
        "no usage chunk the client did not ask for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_gives_several_choices() {
    let s = setup(Behavior::default()).await;
    let reply = s.create(request("two please", json!({"n": 2}))).await;
    assert_eq!(reply.choices.len(), 2);
    let mut output = 0;
    for (i, choice) in reply.choices.iter().enumerate() {
        assert_eq!(choice.index as usize, i);
        let content = choice.message.content.as_ref().unwrap();
        assert!(content.starts_with("Echo: two please"), "{content}");
        output += count_text(MODEL, content);
    }
    assert_eq!(reply.usage.unwrap().completion_tokens as u64, output);

    let chunks = s
        .stream(request(
            "two please",
            json!({"n": 2, "stream_options": {"include_usage": true}}),
        ))
        .await;
    let contents = streamed_content(&chunks);
    assert_eq!(contents.len(), 2);
    assert_eq!(contents[&0], reply.choices[0].message.content.clone().unwrap());
    assert_eq!(contents[&1], contents[&0]);
    assert!(
        chunks.iter().all(|c| c.choices.len() <= 1),
        "each chunk carries one choice"
    );
    assert_eq!(finish_reasons(&chunks).len(), 2);
    let usage = chunks.iter().find_map(|c| c.usage.clone()).unwrap();
    assert_eq!(usage.completion_tokens as u64, output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_gives_valid_json() {
    let s = setup(Behavior::default()).await;
    let reply = s
        .create(request(
            "json please",
            json!({"response_format": {"type": "json_object"}}),
        ))
        .await;
    let content = reply.choices[0].message.content.clone().unwrap();
    let v: Value = serde_json::from_str(&content).unwrap();
    assert!(v.is_object(), "{content}");

    let schema = json!({
        "type": "object",
        "properties": {"title": {"type": "string"}, "rating": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["title", "rating", "tags"],
        "additionalProperties": false
    });
    let format = json!({"type": "json_schema", "json_schema": {"name": "review", "strict": true, "schema": schema}});
    let chunks = s.stream(request("a review", json!({"response_format": format}))).await;
    let content = &streamed_content(&chunks)[&0];
    let v: Value = serde_json::from_str(content).unwrap();
    assert!(
        v["title"].is_string() && v["rating"].is_number() && v["tags"].is_array(),
        "{content}"
    );
    assert_eq!(finish_reasons(&chunks)[&0], FinishReason::Stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_and_stop_end_the_answer_early() {
    let s = setup(Behavior::default()).await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let reply = s.create(request("long answer", json!({field: 4}))).await;
        let content = reply.choices[0].message.content.clone().unwrap();
        assert_eq!(reply.choices[0].finish_reason, Some(FinishReason::Length), "{field}");
        assert_eq!(count_text(MODEL, &content), 4, "{content}");
        assert_eq!(reply.usage.unwrap().completion_tokens, 4);
    }
    let chunks = s.stream(request("long answer", json!({"max_tokens": 4}))).await;
    assert_eq!(finish_reasons(&chunks)[&0], FinishReason::Length);
    assert_eq!(count_text(MODEL, &streamed_content(&chunks)[&0]), 4);

    let reply = s.create(request("halt", json!({"stop": [" brown", " lazy"]}))).await;
    assert_eq!(
        reply.choices[0].message.content.as_deref(),
        Some("Echo: halt The quick")
    );
    assert_eq!(reply.choices[0].finish_reason, Some(FinishReason::Stop));
    let chunks = s.stream(request("halt", json!({"stop": "quick"}))).await;
    assert_eq!(streamed_content(&chunks)[&0], "Echo: halt The ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_cover_the_content() {
    let s = setup(Behavior::default()).await;
    let reply = s
        .create(request("probs", json!({"logprobs": true, "top_logprobs": 2})))
        .await;
    let content = reply.choices[0].message.content.clone().unwrap();
    let tokens = reply.choices[0].logprobs.clone().unwrap().content.unwrap();
    assert_eq!(tokens.iter().map(|t| t.token.as_str()).collect::<String>(), content);
    assert!(tokens.iter().all(|t| t.logprob < 0.0 && t.top_logprobs.len() == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_printed_answers_reach_the_client_intact() {
    let s = setup(Behavior {
        pretty: true,
        ..Behavior::default()
    })
    .await;
    let expected = "Echo: pretty The quick brown fox jumps over the";

    // The client did not ask for usage: the gateway asked, and takes the chunk out again.
    let chunks = s.stream(request("pretty", json!({}))).await;
    assert_eq!(streamed_content(&chunks)[&0], expected);
    assert!(
        chunks.iter().all(|c| c.usage.is_none() && !c.choices.is_empty()),
        "no usage chunk leaks: {chunks:?}"
    );

    let chunks = s
        .stream(request("pretty", json!({"stream_options": {"include_usage": true}})))
        .await;
    assert_eq!(streamed_content(&chunks)[&0], expected);
    let usage = chunks.iter().find_map(|c| c.usage.clone()).unwrap();
    assert_eq!(usage.completion_tokens as u64, count_text(MODEL, expected));

    let chunks = s.stream(request("pretty", json!({"tools": weather_tool()}))).await;
    let arguments: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .flat_map(|c| c.delta.tool_calls.iter().flatten())
        .filter_map(|t| t.function.as_ref()?.arguments.clone())
        .collect();
    serde_json::from_str::<Value>(&arguments).unwrap();

    let reply = s.create(request("pretty", json!({}))).await;
    assert_eq!(reply.choices[0].message.content.as_deref(), Some(expected));
}
