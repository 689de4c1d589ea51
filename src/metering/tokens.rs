//! Real tokenizers (tiktoken's BPE tables, embedded) for estimates when a provider reports no
//! usage. Loading a table costs tens of milliseconds, once, off the hot path: only estimates and
//! the simulated provider count tokens.

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

/// Tokens of plain text.
pub fn count_text(model: &str, text: &str) -> u64 {
    encoding_for(model).encode_ordinary(text).len() as u64
}

/// Tokens of a chat prompt as OpenAI counts them: 3 per message plus its role and content, and
/// 3 priming the reply.
pub fn count_chat_prompt(model: &str, messages: &[ChatMessage]) -> u64 {
    let bpe = encoding_for(model);
    let per_message: u64 = messages
        .iter()
        .map(|m| 3 + bpe.encode_ordinary(&m.role).len() as u64 + bpe.encode_ordinary(&m.text).len() as u64)
        .sum();
    per_message + 3
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
}
