//! What the simulated provider answers, planned from the request as OpenAI reads it: `n`,
//! `stop`, `max_tokens`/`max_completion_tokens`, `tools`/`tool_choice`, `response_format` and
//! `logprobs`/`top_logprobs`. The plan is independent of the wire format, which `openai.rs`
//! renders.
//!
//! Token accounting: each choice's tokens are what the gateway's meter would count for what it
//! delivers (the content, or a tool call's name and arguments) with the model's tokenizer, and
//! `completion_tokens` sums them over the choices.

use super::schema;
use crate::metering::tokens::{count_text, encoding_for};
use rand::Rng;
use serde_json::{json, Value};

/// A request the real API would refuse, with OpenAI's wording.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("Invalid 'n': must be an integer between 1 and 128.")]
    N,
    #[error("Invalid '{0}': integer below minimum value. Expected a value >= 1, but got 0 instead.")]
    MaxTokens(&'static str),
    #[error("Invalid 'top_logprobs': must be an integer between 0 and 20.")]
    TopLogprobs,
    #[error("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.")]
    ToolChoiceWithoutTools,
    #[error("Tool choice '{0}' not found in 'tools' parameter.")]
    UnknownTool(String),
}

impl RequestError {
    /// The request field at fault (OpenAI's `param`).
    pub fn param(&self) -> &'static str {
        match self {
            RequestError::N => "n",
            RequestError::MaxTokens(field) => field,
            RequestError::TopLogprobs => "top_logprobs",
            RequestError::ToolChoiceWithoutTools | RequestError::UnknownTool(_) => "tool_choice",
        }
    }
}

/// The most choices OpenAI gives for one request.
const MAX_N: u64 = 128;
/// The most `top_logprobs` OpenAI gives.
const MAX_TOP_LOGPROBS: u64 = 20;

/// What one choice says.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Text, in the pieces it is streamed in.
    Text(Vec<String>),
    /// One call of a function tool; its arguments (a JSON object) in the pieces they are
    /// streamed in.
    ToolCall {
        id: String,
        name: String,
        arguments: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub output: Output,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
    /// The stop string the text was cut at, when that ended it (Anthropic names it in
    /// `stop_sequence`; OpenAI says only `stop`).
    pub stop: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub choices: Vec<Choice>,
    pub completion_tokens: u64,
    /// `Some(top_logprobs)` when the request asked for `logprobs`.
    pub logprobs: Option<usize>,
}

/// Plan the answer to `request` for `model`; `chunks` is the number of pieces of a plain text
/// answer (the [`super::Behavior`] setting).
pub fn plan(request: &Value, model: &str, chunks: usize) -> Result<Plan, RequestError> {
    let n = match &request["n"] {
        Value::Null => 1,
        v => v.as_u64().filter(|n| (1..=MAX_N).contains(n)).ok_or(RequestError::N)?,
    };
    // OpenAI refuses both at once; when both come anyway, the newer name wins.
    let max_tokens = match (&request["max_completion_tokens"], &request["max_tokens"]) {
        (Value::Null, Value::Null) => None,
        (Value::Null, v) => Some(
            v.as_u64()
                .filter(|&m| m > 0)
                .ok_or(RequestError::MaxTokens("max_tokens"))?,
        ),
        (v, _) => Some(
            v.as_u64()
                .filter(|&m| m > 0)
                .ok_or(RequestError::MaxTokens("max_completion_tokens"))?,
        ),
    };
    let logprobs = match request["logprobs"].as_bool().unwrap_or(false) {
        false => None,
        true => match &request["top_logprobs"] {
            Value::Null => Some(0),
            v => Some(
                v.as_u64()
                    .filter(|&t| t <= MAX_TOP_LOGPROBS)
                    .ok_or(RequestError::TopLogprobs)? as usize,
            ),
        },
    };
    let stops = stop_strings(&request["stop"]);
    let tool = chosen_tool(request)?;

    let mut choices = Vec::with_capacity(n as usize);
    let mut completion_tokens = 0;
    for _ in 0..n {
        let (choice, tokens) = match tool {
            Some((name, parameters)) => tool_call(model, name, parameters, max_tokens),
            None => text(model, answer_text_pieces(request, model, chunks), &stops, max_tokens),
        };
        choices.push(choice);
        completion_tokens += tokens;
    }
    Ok(Plan {
        choices,
        completion_tokens,
        logprobs,
    })
}

/// The function tool the model calls, with its parameters' schema: none for `tool_choice: none`
/// or without tools, the first for `auto` (the default) and `required`, the named one for
/// `{"type": "function", "function": {"name": ...}}`.
fn chosen_tool(request: &Value) -> Result<Option<(&str, &Value)>, RequestError> {
    let tools: Vec<(&str, &Value)> = request["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "function")
        .filter_map(|t| Some((t["function"]["name"].as_str()?, &t["function"]["parameters"])))
        .collect();
    let choice = &request["tool_choice"];
    match choice.as_str() {
        Some("none") => Ok(None),
        Some("required") if tools.is_empty() => Err(RequestError::ToolChoiceWithoutTools),
        _ if choice.is_object() => {
            let name = choice["function"]["name"].as_str().unwrap_or_default();
            if tools.is_empty() {
                return Err(RequestError::ToolChoiceWithoutTools);
            }
            match tools.iter().find(|(n, _)| *n == name) {
                Some(tool) => Ok(Some(*tool)),
                None => Err(RequestError::UnknownTool(name.to_owned())),
            }
        }
        // `auto`, `required`, or absent.
        _ => Ok(tools.first().copied()),
    }
}

/// `stop`: one string or a list of them (empty ones stop nothing).
fn stop_strings(stop: &Value) -> Vec<String> {
    let list = match stop {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    list.into_iter().filter(|s| !s.is_empty()).collect()
}

fn tool_call(model: &str, name: &str, parameters: &Value, max_tokens: Option<u64>) -> (Choice, u64) {
    let mut arguments = serde_json::to_string(&schema::example(parameters)).unwrap_or_else(|_| "{}".into());
    let mut finish_reason = "tool_calls";
    if let Some(max) = max_tokens {
        if let Some(cut) = token_cut(model, &arguments, max) {
            arguments.truncate(cut);
            finish_reason = "length";
        }
    }
    // The gateway's meter counts a streamed call's name and arguments as one text.
    let tokens = count_text(model, &format!("{name}{arguments}"));
    let choice = Choice {
        output: Output::ToolCall {
            id: tool_call_id(),
            name: name.to_owned(),
            arguments: token_pieces(model, &arguments),
        },
        finish_reason,
        stop: None,
    };
    (choice, tokens)
}

/// OpenAI's shape: `call_` and 24 letters and digits.
fn tool_call_id() -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("call_{tail}")
}

/// A text answer cut at the first stop string (`stop`), then at `max_tokens` (`length`).
fn text(model: &str, mut pieces: Vec<String>, stops: &[String], max_tokens: Option<u64>) -> (Choice, u64) {
    let mut content = pieces.concat();
    let mut finish_reason = "stop";
    let mut stop = None;
    if let Some((at, s)) = stops
        .iter()
        .filter_map(|s| Some((content.find(s.as_str())?, s)))
        .min_by_key(|(at, _)| *at)
    {
        content.truncate(at);
        stop = Some(s.clone());
    }
    if let Some(max) = max_tokens {
        if let Some(cut) = token_cut(model, &content, max) {
            content.truncate(cut);
            finish_reason = "length";
            // Cut before it reached the stop string.
            stop = None;
        }
    }
    cut_pieces(&mut pieces, content.len());
    (
        Choice {
            output: Output::Text(pieces),
            finish_reason,
            stop,
        },
        count_text(model, &content),
    )
}

/// Keep the first `len` bytes of the pieces' concatenation (at a char boundary), dropping the
/// pieces left empty.
fn cut_pieces(pieces: &mut Vec<String>, mut len: usize) {
    pieces.retain_mut(|p| {
        let keep = p.len().min(len);
        p.truncate(keep);
        len -= keep;
        !p.is_empty()
    });
}

/// Where to cut `text` so it is at most `max` tokens, or None when it already is.
fn token_cut(model: &str, text: &str, max: u64) -> Option<usize> {
    let bpe = encoding_for(model);
    let tokens = bpe.encode_ordinary(text);
    if tokens.len() as u64 <= max {
        return None;
    }
    let mut keep = max as usize;
    loop {
        let mut cut = bpe.decode_bytes(&tokens[..keep]).map_or(0, |b| b.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        // Tokenizing a prefix again rarely gives more tokens than it was cut from; if it does,
        // cut a token earlier, so `length` always means at most `max`.
        if keep == 0 || count_text(model, &text[..cut]) <= max {
            return Some(cut);
        }
        keep -= 1;
    }
}

/// `text` cut where the tokenizer cuts it, one piece per token as OpenAI streams them; a token
/// that ends inside a UTF-8 character goes out with the next.
pub fn token_pieces(model: &str, text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut pending = Vec::new();
    for bytes in token_bytes(model, text) {
        pending.extend_from_slice(&bytes);
        match String::from_utf8(std::mem::take(&mut pending)) {
            Ok(piece) => pieces.push(piece),
            Err(e) => pending = e.into_bytes(),
        }
    }
    if !pending.is_empty() {
        pieces.push(String::from_utf8_lossy(&pending).into_owned());
    }
    pieces
}

/// The bytes of each token of `text`.
pub fn token_bytes(model: &str, text: &str) -> Vec<Vec<u8>> {
    let bpe = encoding_for(model);
    bpe.encode_ordinary(text)
        .into_iter()
        .map(|t| bpe.decode_bytes(&[t]).unwrap_or_default())
        .collect()
}

/// The text before any cut: JSON for `response_format`, else the echo and filler.
fn answer_text_pieces(request: &Value, model: &str, chunks: usize) -> Vec<String> {
    let format = &request["response_format"];
    match format["type"].as_str() {
        Some("json_schema") => {
            let value = schema::example(&format["json_schema"]["schema"]);
            token_pieces(model, &serde_json::to_string(&value).unwrap_or_default())
        }
        Some("json_object") => {
            let filler: String = answer_pieces(request, chunks)
                .iter()
                .skip(1)
                .map(String::as_str)
                .collect();
            let value = json!({"echo": last_user_text(request), "answer": filler.trim_start()});
            token_pieces(model, &serde_json::to_string(&value).unwrap_or_default())
        }
        _ => answer_pieces(request, chunks),
    }
}

/// Words of the filler text after the echo.
const FILLER: [&str; 16] = [
    " The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " while", " the", " gateway",
    " counts", " every", " token", ".",
];

/// The default answer's pieces: an echo of the start of the last user message (so concurrent
/// callers can check they got their own answer), then filler, `chunks` pieces in all.
fn answer_pieces(request: &Value, chunks: usize) -> Vec<String> {
    let mut pieces = Vec::with_capacity(chunks);
    if chunks > 0 {
        pieces.push(format!("Echo: {}", last_user_text(request)));
    }
    for i in 1..chunks {
        pieces.push(FILLER[(i - 1) % FILLER.len()].to_owned());
    }
    pieces
}

/// The start of the last user message (64 characters at most).
fn last_user_text(request: &Value) -> String {
    let text = request["messages"]
        .as_array()
        .and_then(|msgs| msgs.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        })
        .unwrap_or_default();
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "gpt-4o-mini";

    fn ask(extra: Value) -> Value {
        let mut request = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        request
    }

    fn content(choice: &Choice) -> String {
        match &choice.output {
            Output::Text(pieces) => pieces.concat(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_echo_and_filler() {
        let p = plan(&ask(json!({})), MODEL, 4).unwrap();
        assert_eq!(p.choices.len(), 1);
        assert_eq!(
            p.choices[0].output,
            Output::Text(vec!["Echo: hi".into(), " The".into(), " quick".into(), " brown".into()])
        );
        assert_eq!(p.choices[0].finish_reason, "stop");
        assert_eq!(p.completion_tokens, count_text(MODEL, "Echo: hi The quick brown"));
        assert_eq!(p.logprobs, None);
    }

    #[test]
    fn n_gives_that_many_choices_and_sums_their_tokens() {
        let p = plan(&ask(json!({"n": 3})), MODEL, 4).unwrap();
        assert_eq!(p.choices.len(), 3);
        assert_eq!(p.completion_tokens, 3 * count_text(MODEL, "Echo: hi The quick brown"));
        assert_eq!(plan(&ask(json!({"n": 0})), MODEL, 4), Err(RequestError::N));
        assert_eq!(plan(&ask(json!({"n": 129})), MODEL, 4), Err(RequestError::N));
    }

    #[test]
    fn stop_cuts_before_the_first_stop_string() {
        let p = plan(&ask(json!({"stop": [" fox", " quick"]})), MODEL, 8).unwrap();
        assert_eq!(content(&p.choices[0]), "Echo: hi The");
        assert_eq!(p.choices[0].finish_reason, "stop");
        assert_eq!(
            p.choices[0].stop.as_deref(),
            Some(" quick"),
            "the first one in the text"
        );
        assert_eq!(p.completion_tokens, count_text(MODEL, "Echo: hi The"));
        let p = plan(&ask(json!({"stop": "brown"})), MODEL, 8).unwrap();
        assert_eq!(content(&p.choices[0]), "Echo: hi The quick ");
        assert_eq!(
            p.choices[0].output,
            Output::Text(vec!["Echo: hi".into(), " The".into(), " quick".into(), " ".into()]),
            "the cut piece keeps its start"
        );
    }

    #[test]
    fn max_tokens_truncates_with_finish_reason_length() {
        for field in ["max_tokens", "max_completion_tokens"] {
            let p = plan(&ask(json!({field: 3})), MODEL, 8).unwrap();
            let text = content(&p.choices[0]);
            assert_eq!(p.choices[0].finish_reason, "length", "{field}");
            assert_eq!(p.completion_tokens, 3);
            assert_eq!(count_text(MODEL, &text), 3);
            assert!("Echo: hi The quick".starts_with(&text), "{text}");
        }
        // Both: the newer name wins.
        let p = plan(&ask(json!({"max_tokens": 1, "max_completion_tokens": 100})), MODEL, 8).unwrap();
        assert_eq!(p.choices[0].finish_reason, "stop");
        // A cap the answer fits in changes nothing.
        let p = plan(&ask(json!({"max_tokens": 100})), MODEL, 4).unwrap();
        assert_eq!(p, plan(&ask(json!({})), MODEL, 4).unwrap());
        assert_eq!(
            plan(&ask(json!({"max_tokens": 0})), MODEL, 4),
            Err(RequestError::MaxTokens("max_tokens"))
        );
        // A cut never splits a character.
        let wide = json!({"messages": [{"role": "user", "content": "日本語のテキスト"}], "max_tokens": 4});
        let p = plan(&wide, MODEL, 1).unwrap();
        assert!(content(&p.choices[0]).starts_with("Echo: "));
        assert!(p.completion_tokens <= 4);
    }

    fn weather_tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
            {"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"]
            }}}
        ])
    }

    #[test]
    fn tools_answer_with_a_call() {
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let p = plan(&ask(json!({"tools": weather_tools(), "tool_choice": named})), MODEL, 8).unwrap();
        let Output::ToolCall { id, name, arguments } = &p.choices[0].output else {
            panic!("a tool call: {p:?}")
        };
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
        assert_eq!(name, "get_weather");
        let args = arguments.concat();
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"city": "Paris", "days": 1})
        );
        assert!(arguments.len() > 1, "streamed in token pieces: {arguments:?}");
        assert_eq!(p.choices[0].finish_reason, "tool_calls");
        assert_eq!(p.completion_tokens, count_text(MODEL, &format!("get_weather{args}")));

        for choice in [json!("auto"), json!("required"), Value::Null] {
            let p = plan(&ask(json!({"tools": weather_tools(), "tool_choice": choice})), MODEL, 8).unwrap();
            assert!(
                matches!(&p.choices[0].output, Output::ToolCall { name, arguments, .. } if name == "get_time" && arguments.concat() == "{}"),
                "{choice}: the first tool"
            );
        }
        let p = plan(&ask(json!({"tools": weather_tools(), "tool_choice": "none"})), MODEL, 8).unwrap();
        assert!(matches!(p.choices[0].output, Output::Text(_)));

        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(
            plan(
                &ask(json!({"tools": weather_tools(), "tool_choice": unknown})),
                MODEL,
                8
            ),
            Err(RequestError::UnknownTool("nope".into()))
        );
        assert_eq!(
            plan(&ask(json!({"tool_choice": "required"})), MODEL, 8),
            Err(RequestError::ToolChoiceWithoutTools)
        );
        let p = plan(&ask(json!({"tools": weather_tools(), "n": 2})), MODEL, 8).unwrap();
        let ids: Vec<_> = p
            .choices
            .iter()
            .map(|c| match &c.output {
                Output::ToolCall { id, .. } => id.clone(),
                _ => panic!("a call"),
            })
            .collect();
        assert_ne!(ids[0], ids[1], "every call has its own id");
    }

    #[test]
    fn json_modes_give_valid_json() {
        let p = plan(&ask(json!({"response_format": {"type": "json_object"}})), MODEL, 4).unwrap();
        let v: Value = serde_json::from_str(&content(&p.choices[0])).unwrap();
        assert_eq!(v, json!({"echo": "hi", "answer": "The quick brown"}));

        let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "number"}},
            "required": ["answer", "score"], "additionalProperties": false});
        let format = json!({"type": "json_schema", "json_schema": {"name": "r", "strict": true, "schema": schema}});
        let p = plan(&ask(json!({"response_format": format})), MODEL, 4).unwrap();
        let text = content(&p.choices[0]);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["answer"].is_string() && v["score"].is_number(), "{v}");
        assert_eq!(p.completion_tokens, count_text(MODEL, &text));
        assert_eq!(p.completion_tokens as usize, token_pieces(MODEL, &text).len());
    }

    #[test]
    fn logprobs_are_asked_for_explicitly() {
        assert_eq!(
            plan(&ask(json!({"logprobs": true})), MODEL, 2).unwrap().logprobs,
            Some(0)
        );
        assert_eq!(
            plan(&ask(json!({"logprobs": true, "top_logprobs": 3})), MODEL, 2)
                .unwrap()
                .logprobs,
            Some(3)
        );
        assert_eq!(
            plan(&ask(json!({"logprobs": true, "top_logprobs": 21})), MODEL, 2),
            Err(RequestError::TopLogprobs)
        );
    }

    #[test]
    fn token_pieces_keep_characters_whole() {
        let text = "héllo 日本語 🦀 done";
        let pieces = token_pieces(MODEL, text);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.len() > 3);
    }
}
