//! Counting tokens and pricing them.
//!
//! The provider's own figures come first: `usage` in a JSON answer, the usage chunk of an
//! OpenAI stream (requested upstream whatever the client asked, and removed again when the
//! client did not ask). When a stream ends without usage (client gone, upstream reset), the
//! delivered output and the prompt are counted with the model's real tokenizer and the record is
//! marked estimated.

pub mod stream;
pub mod tokens;

use crate::catalog::ModelPrice;
use crate::money::{token_cost, NanoUsd};
use komilion_sdk::Usage;
use serde_json::Value;

/// Usage from an OpenAI `usage` object (`prompt_tokens`, `completion_tokens`, and the cached
/// and reasoning details when reported).
pub fn usage_from_openai(usage: &Value) -> Option<Usage> {
    let input = usage.get("prompt_tokens")?.as_u64()?;
    let output = usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
            .min(input),
        reasoning_tokens: usage["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap_or(0),
        estimated: false,
    })
}

/// Usage of a non-streamed OpenAI answer body.
pub fn usage_from_body(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<Value>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    usage_from_openai(answer.usage.as_ref()?)
}

/// What `usage` costs at `price`. Cached input tokens are billed at the cached price, the rest
/// of the input at the input price, all output (reasoning included) at the output price; each
/// part is rounded up to the nano-dollar.
pub fn cost(price: &ModelPrice, usage: &Usage) -> NanoUsd {
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    token_cost(usage.input_tokens - cached, price.input)
        + token_cost(cached, price.cached_input)
        + token_cost(usage.output_tokens, price.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_usage_with_details() {
        let v: Value = serde_json::json!({"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 60}, "completion_tokens_details": {"reasoning_tokens": 12}});
        let u = usage_from_openai(&v).unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cached_input_tokens,
                u.reasoning_tokens
            ),
            (100, 20, 60, 12)
        );
        assert!(!u.estimated);
        assert_eq!(usage_from_body(br#"{"id":"x","usage":null}"#), None);
    }

    #[test]
    fn costs_split_cached_input() {
        // gpt-4o-mini: $0.15 in, $0.075 cached, $0.60 out per 1M tokens.
        let price = ModelPrice {
            input: 150_000_000,
            output: 600_000_000,
            cached_input: 75_000_000,
        };
        let usage = Usage {
            input_tokens: 1000,
            cached_input_tokens: 400,
            output_tokens: 100,
            ..Default::default()
        };
        // 600 × 150 + 400 × 75 + 100 × 600 nano-USD.
        assert_eq!(cost(&price, &usage), 90_000 + 30_000 + 60_000);
    }
}
