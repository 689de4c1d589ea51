//! Real tokenizers (tiktoken's BPE tables, embedded) for estimates when a provider reports no
//! usage. Loading a table costs tens of milliseconds, once, off the hot path: only estimates and
//! the simulated provider count tokens.
//!
//! **Bounded cost.** BPE costs more than linear time in the length of a run without spaces, and
//! a client chooses what it sends: a 2 MiB prompt took seconds of a worker's CPU. Text up to
//! [`EXACT_BYTES`] is counted exactly; longer text is counted from its first and last
//! [`SAMPLE_BYTES`], the middle estimated at the samples' tokens per byte. What the count is for
//! (holds, limits, estimates of a stream that ended without usage) needs no more precision than
//! that, and a provider's own usage, when it reports one, is what gets billed.

use komilion_sdk::ChatMessage;
use tiktoken_rs::CoreBPE;

/// The encoding of a model: `o200k_base` for the GPT-4o generation and later (gpt-4o, gpt-4.1,
/// gpt-5, o1, o3, o4), `cl100k_base` otherwise (gpt-4, gpt-3.5, and an approximation for
/// other vendors' models, whose tokenizers are not public).
pub fn encoding_for(model: &str) -> &'static CoreBPE {
    let m = model.rsplit('/').next().unwrap_or(model);
    let o200k = ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"];
    if o200k.iter().any(|p| m.starts_with(p)) {
        tiktoken_rs::o200k_base_singleton()
    } else {
        tiktoken_rs::cl100k_base_singleton()
    }
}

/// Text up to this many bytes is counted exactly.
pub const EXACT_BYTES: usize = 64 * 1024;
/// Longer text is counted from samples of this many bytes at each end.
pub const SAMPLE_BYTES: usize = 32 * 1024;

/// Tokens of plain text (exact up to [`EXACT_BYTES`], sampled beyond).
pub fn count_text(model: &str, text: &str) -> u64 {
    count_bounded(encoding_for(model), text)
}

/// The last point in `text` where tiktoken's pre-tokenizer splits anyway: a space between a
/// non-space character and a letter (`abc| def`). Tokens never span pre-token boundaries, so
/// counting the two sides apart gives the same total. Text with no such point (one long run
/// without spaces) is cut at its end, off by a token at most.
pub fn token_boundary(text: &str) -> usize {
    let bytes = text.as_bytes();
    (1..bytes.len().saturating_sub(1))
        .rev()
        .find(|&i| bytes[i] == b' ' && !bytes[i - 1].is_ascii_whitespace() && bytes[i + 1].is_ascii_alphabetic())
        .unwrap_or(text.len())
}

/// The first such split point in `text`.
fn first_token_boundary(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (1..bytes.len().saturating_sub(1))
        .find(|&i| bytes[i] == b' ' && !bytes[i - 1].is_ascii_whitespace() && bytes[i + 1].is_ascii_alphabetic())
}

fn count_bounded(bpe: &CoreBPE, text: &str) -> u64 {
    if text.len() <= EXACT_BYTES {
        return bpe.encode_ordinary(text).len() as u64;
    }
    // Samples end where the tokenizer splits anyway, so no token is cut in two.
    let mut head_end = SAMPLE_BYTES;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    head_end = token_boundary(&text[..head_end]);
    let mut tail_start = text.len() - SAMPLE_BYTES;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    tail_start += first_token_boundary(&text[tail_start..]).unwrap_or(0);
    let (head, tail) = (&text[..head_end], &text[tail_start..]);
    let sampled = (bpe.encode_ordinary(head).len() + bpe.encode_ordinary(tail).len()) as u128;
    let sample_bytes = (head.len() + tail.len()) as u128;
    let middle = (tail_start - head_end) as u128;
    (sampled + (middle * sampled).div_ceil(sample_bytes)) as u64
}

/// Tokens of a chat prompt as OpenAI counts them: 3 per message plus its role and content, and
/// 3 priming the reply.
///
/// The tokenizer sees at most about [`EXACT_BYTES`] of the whole prompt, however many messages
/// it has: once that budget is spent, further messages are estimated at the tokens per byte
/// measured so far.
pub fn count_chat_prompt(model: &str, messages: &[ChatMessage]) -> u64 {
    let bpe = encoding_for(model);
    let mut budget = EXACT_BYTES;
    let (mut counted_bytes, mut counted_tokens) = (0u64, 0u64);
    let mut total = 3;
    for m in messages {
        let text = m.text.as_str();
        let tokens = if text.len() <= budget {
            budget -= text.len();
            bpe.encode_ordinary(text).len() as u64
        } else if budget == EXACT_BYTES {
            // The first long message: its own samples are the measure.
            budget = 0;
            count_bounded(bpe, text)
        } else {
            budget = 0;
            let per_byte = if counted_bytes > 0 {
                counted_tokens as f64 / counted_bytes as f64
            } else {
                0.25
            };
            (text.len() as f64 * per_byte).ceil() as u64
        };
        counted_bytes += text.len() as u64;
        counted_tokens += tokens;
        total += 3 + bpe.encode_ordinary(truncate(&m.role, 64)).len() as u64 + tokens;
    }
    total
}

/// At most `max` bytes of `text`, on a character boundary (roles are short; a client's are not
/// trusted to be).
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_like_tiktoken() {
        assert_eq!(count_text("gpt-4o-mini", "Hello, world!"), 4);
        assert_eq!(count_text("gpt-4", "Hello, world!"), 4);
        let msgs = [ChatMessage {
            role: "user".into(),
            text: "Hello, world!".into(),
        }];
        // 3 + 1 ("user") + 4, plus 3 for the reply.
        assert_eq!(count_chat_prompt("gpt-4o", &msgs), 11);
        assert!(std::ptr::eq(
            encoding_for("openai/gpt-4.1-mini"),
            encoding_for("gpt-4o")
        ));
    }

    #[test]
    fn long_text_is_counted_from_samples_close_to_the_exact_count() {
        let text = "The quick brown fox jumps over the lazy dog; ünïcödé too. ".repeat(4000);
        assert!(text.len() > 3 * EXACT_BYTES);
        let exact = encoding_for("gpt-4o").encode_ordinary(&text).len() as f64;
        let sampled = count_text("gpt-4o", &text) as f64;
        assert!((sampled - exact).abs() / exact < 0.01, "{sampled} vs {exact}");
        // Many long messages cost no more than one: the budget is per prompt.
        let messages: Vec<ChatMessage> = (0..20)
            .map(|_| ChatMessage {
                role: "user".into(),
                text: "Lorem ipsum dolor sit amet. ".repeat(2300),
            })
            .collect();
        let exact: u64 = messages
            .iter()
            .map(|m| 3 + 1 + encoding_for("gpt-4o").encode_ordinary(&m.text).len() as u64)
            .sum::<u64>()
            + 3;
        let estimate = count_chat_prompt("gpt-4o", &messages);
        assert!(
            (estimate as f64 - exact as f64).abs() / (exact as f64) < 0.01,
            "{estimate} vs {exact}"
        );
        // Uniform text is counted exactly: the samples end at split points.
        let hellos = " hello".repeat(200_000);
        assert_eq!(count_text("gpt-4o-mini", &hellos), 200_000);
        // The worst case for BPE, one run without spaces, costs no more than the samples.
        let run = "x".repeat(4 * 1024 * 1024);
        let tokens = count_text("gpt-4o", &run);
        assert!((400_000..=600_000).contains(&tokens), "{tokens}");
    }
}
