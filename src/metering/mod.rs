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

/// An OpenAI `usage` object, as the provider sends it (in a JSON answer and in a stream's usage
/// chunk). Typed rather than a `serde_json::Value`: this runs on every answer, and a `Value`
/// costs an allocation per key.
#[derive(Debug, serde::Deserialize)]
pub struct OpenAiUsage {
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, serde::Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Debug, serde::Deserialize)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl From<OpenAiUsage> for Usage {
    fn from(u: OpenAiUsage) -> Usage {
        let input = u.prompt_tokens;
        Usage {
            input_tokens: input,
            output_tokens: u.completion_tokens,
            cached_input_tokens: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .min(input),
            reasoning_tokens: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
            ..Usage::default()
        }
    }
}

/// Usage of a non-streamed OpenAI answer body (every other member is skipped unparsed).
pub fn usage_from_body(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<OpenAiUsage>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    answer.usage.map(Usage::from)
}

/// What `usage` costs at `price`, as providers bill it: input read from the prompt cache at
/// the cached price, input written to it at the write price of its lifetime, the rest of the
/// input at the input price, all output (reasoning included) at the output price; each part is
/// rounded up to the nano-dollar.
pub fn cost(price: &ModelPrice, usage: &Usage) -> NanoUsd {
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    let written = usage.cache_write_input_tokens.min(usage.input_tokens - cached);
    let written_1h = usage.cache_write_1h_input_tokens.min(written);
    // Saturating: a provider's absurd counts cap the cost instead of wrapping it.
    [
        token_cost(usage.input_tokens - cached - written, price.input),
        token_cost(cached, price.cached_input),
        token_cost(written - written_1h, price.cache_write_input),
        token_cost(written_1h, price.cache_write_1h_input),
        token_cost(usage.output_tokens, price.output),
    ]
    .into_iter()
    .fold(0, NanoUsd::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_usage_with_details() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"\"usage\": {}"}}],"usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,
            "prompt_tokens_details":{"cached_tokens":60,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":12}}}"#;
        let u = usage_from_body(body).unwrap();
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
        assert_eq!(usage_from_body(br#"{"id":"x"}"#), None);
        // Providers that send null details, or none.
        let u = usage_from_body(br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":null}}"#)
            .unwrap();
        assert_eq!((u.input_tokens, u.output_tokens, u.cached_input_tokens), (5, 1, 0));
    }

    #[test]
    fn costs_split_cached_input() {
        // gpt-4o-mini: $0.15 in, $0.075 cached, $0.60 out per 1M tokens.
        let price = ModelPrice {
            cached_input: 75_000_000,
            ..ModelPrice::flat(150_000_000, 600_000_000)
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

    #[test]
    fn cache_writes_are_billed_at_their_lifetimes_price() {
        // claude-sonnet-4-5: $3 in, $0.30 cache read, $3.75 5-minute write, $6 1-hour write,
        // $15 out per 1M tokens.
        let price = ModelPrice {
            input: 3_000_000_000,
            output: 15_000_000_000,
            cached_input: 300_000_000,
            cache_write_input: 3_750_000_000,
            cache_write_1h_input: 6_000_000_000,
        };
        // Anthropic's usage {input_tokens: 100, cache_read_input_tokens: 2000,
        // cache_creation_input_tokens: 1500 (500 of them 1h), output_tokens: 50}.
        let usage = Usage {
            input_tokens: 100 + 2000 + 1500,
            cached_input_tokens: 2000,
            cache_write_input_tokens: 1500,
            cache_write_1h_input_tokens: 500,
            output_tokens: 50,
            ..Default::default()
        };
        assert_eq!(
            cost(&price, &usage),
            100 * 3_000 + 2000 * 300 + 1000 * 3_750 + 500 * 6_000 + 50 * 15_000
        );
        // Counts that do not add up never bill a token twice or below zero.
        let odd = Usage {
            input_tokens: 10,
            cached_input_tokens: 8,
            cache_write_input_tokens: 8,
            cache_write_1h_input_tokens: 9,
            ..Default::default()
        };
        assert_eq!(cost(&price, &odd), 8 * 300 + 2 * 6_000);
    }
}
