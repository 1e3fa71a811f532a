//! Answer-quality evaluation of a chat model on SFT conversations: each conversation's last
//! assistant turn is the reference, everything before it (system included) is the prompt,
//! rendered with the chat template and its generation prompt; answers are decoded greedily by
//! the core engine and scored with `text_metrics` (BLEU-4, ROUGE-L, character F1).
use anyhow::{bail, Result};

use crate::data::{Conversation, Origin};
use crate::eval::text_metrics::{score_answers, AnswerScores};
use crate::infer::generate::{generate_with_stats, SamplingConfig};
use crate::model::decoder::CausalLm;
use crate::text::chat::ChatMessage;
use crate::text::tokenizer::ModelTokenizer;

/// A prompt and the answer it should get.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerCase {
    /// The messages before the last assistant turn, system message first when there is one.
    pub prompt: Vec<ChatMessage>,
    /// The last assistant turn's content.
    pub reference: String,
    pub origin: Origin,
}

/// Splits a conversation at its last assistant turn.
pub fn answer_case(conversation: &Conversation) -> Result<AnswerCase> {
    if !conversation.tools.is_empty() || conversation.messages.iter().any(|m| !m.tool_calls.is_empty()) {
        bail!(
            "{}: answer evaluation scores text answers; expected a conversation without tools or tool calls",
            conversation.origin
        );
    }
    let messages = conversation.to_messages();
    let Some(last) = messages.iter().rposition(|m| m.role == "assistant") else {
        bail!("{}: the conversation has no assistant turn to use as the reference", conversation.origin);
    };
    if last == 0 {
        bail!("{}: the conversation has no prompt before its assistant turn", conversation.origin);
    }
    Ok(AnswerCase {
        prompt: messages[..last].to_vec(),
        reference: messages[last].content.clone(),
        origin: conversation.origin.clone(),
    })
}

/// The ids that end generation: the tokenizer's eos ids, then any other eos id of the model
/// config.
pub fn stop_token_ids(tok: &ModelTokenizer, config_eos: &[i64]) -> Vec<i64> {
    let mut eos = tok.eos_token_ids.clone();
    eos.extend(config_eos.iter().copied().filter(|e| !tok.eos_token_ids.contains(e)));
    eos
}

/// The last `keep` ids of a prompt that does not fit (None when it fits).
pub fn keep_prompt_tail(ids: &[i64], keep: usize) -> Option<Vec<i64>> {
    (ids.len() > keep).then(|| ids[ids.len() - keep..].to_vec())
}

/// One answered case.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    /// The prompt as the model saw it (rendered chat template, generation prompt included).
    pub prompt: String,
    pub reference: String,
    pub answer: String,
    /// Whether the answer ended on an eos token (not on the token limit).
    pub stopped_on_eos: bool,
}

/// What `evaluate_answers` returns.
#[derive(Debug, Clone)]
pub struct AnswerEval {
    pub scores: AnswerScores,
    pub answered: Vec<Answered>,
    /// Prompts that were cut from the left to fit `max_position_embeddings`.
    pub truncated_prompts: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// Generates greedy answers to `cases` in batches of `batch_size` and scores them.
pub fn evaluate_answers(
    lm: &CausalLm,
    tok: &ModelTokenizer,
    cases: &[AnswerCase],
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<AnswerEval> {
    let max_positions = lm.config.max_position_embeddings.max(0) as usize;
    if max_new_tokens == 0 || max_new_tokens >= max_positions {
        bail!(
            "--max-new-tokens: expected 1 to {} (the model's max_position_embeddings {max_positions} leaves room for the prompt), found {max_new_tokens}",
            max_positions.saturating_sub(1)
        );
    }
    let keep = max_positions - max_new_tokens;
    let mut prompts = Vec::with_capacity(cases.len());
    let mut encoded = Vec::with_capacity(cases.len());
    let mut truncated_prompts = 0;
    for case in cases {
        let text = tok.apply_chat_template(&case.prompt, true)?;
        // a rendered chat template already holds its special tokens
        let mut ids = tok.encode(&text, false)?;
        if ids.is_empty() {
            bail!("{}: the prompt encodes to no tokens", case.origin);
        }
        if let Some(tail) = keep_prompt_tail(&ids, keep) {
            ids = tail;
            truncated_prompts += 1;
        }
        prompts.push(text);
        encoded.push(ids);
    }
    let cfg = SamplingConfig { max_new_tokens, temperature: 0.0, top_k: None, top_p: None, repetition_penalty: None };
    let eos = stop_token_ids(tok, &lm.config.eos_token_ids);
    let mut answered = Vec::with_capacity(cases.len());
    let mut generated_tokens = 0;
    let mut seconds = 0.0;
    let batch = batch_size.max(1);
    for (chunk_index, chunk) in encoded.chunks(batch).enumerate() {
        let (gens, stats) = generate_with_stats(lm, chunk, &cfg, &eos, tok.padding_id())?;
        generated_tokens += stats.new_tokens;
        seconds += stats.prefill_seconds + stats.decode_seconds;
        for (j, g) in gens.iter().enumerate() {
            let i = chunk_index * batch + j;
            answered.push(Answered {
                prompt: prompts[i].clone(),
                reference: cases[i].reference.clone(),
                answer: tok.decode(&g.tokens, true)?.trim().to_string(),
                stopped_on_eos: g.stopped_on_eos,
            });
        }
        tracing::info!("answered {}/{} prompts", answered.len(), cases.len());
    }
    let pairs: Vec<(&str, &str)> = answered.iter().map(|a| (a.answer.as_str(), a.reference.as_str())).collect();
    Ok(AnswerEval { scores: score_answers(&pairs), answered, truncated_prompts, generated_tokens, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn conversation(system: Option<&str>, turns: &[(&str, &str)]) -> Conversation {
        Conversation {
            system: system.map(str::to_string),
            messages: turns.iter().map(|(r, c)| ChatMessage::new(r, c)).collect(),
            tools: Vec::new(),
            origin: Origin::line(Path::new("d.jsonl"), 3),
        }
    }

    #[test]
    fn the_last_assistant_turn_is_the_reference_and_the_rest_the_prompt() {
        let c = conversation(
            Some("Be brief."),
            &[("user", "Hi"), ("assistant", "Hello."), ("user", "Fever?"), ("assistant", "Rest and fluids.")],
        );
        let case = answer_case(&c).unwrap();
        assert_eq!(case.reference, "Rest and fluids.");
        let roles: Vec<&str> = case.prompt.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(case.prompt[3].content, "Fever?");
        let e = answer_case(&conversation(None, &[("user", "Hi")])).unwrap_err().to_string();
        assert_eq!(e, "d.jsonl:3: the conversation has no assistant turn to use as the reference");
    }

    #[test]
    fn long_prompts_keep_their_tail() {
        assert_eq!(keep_prompt_tail(&[1, 2, 3, 4], 2), Some(vec![3, 4]));
        assert_eq!(keep_prompt_tail(&[1, 2], 2), None);
    }
}
