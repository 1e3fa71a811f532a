//! Conversations → token ids with labels on assistant tokens only, through the model's own chat
//! template (the same rendering `generate --chat`, RM, DPO and PPO use).
use std::ops::Range;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::text::chat::{ChatMessage, ChatTemplate};
/// The label of a position that is not predicted (prompt tokens, padding), as in PyTorch and
/// transformers.
pub const IGNORE_INDEX: i64 = -100;
use crate::text::tokenizer::ModelTokenizer;

/// Token ids and next-token labels (`IGNORE_INDEX` where no loss is taken).
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledTokens {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

impl LabeledTokens {
    /// Number of positions that carry a label.
    pub fn label_count(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Keeps the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.input_ids.truncate(len);
        self.labels.truncate(len);
    }
}

/// Byte ranges of the rendered conversation produced by each assistant turn (its content and
/// the template's end-of-turn text), found by rendering growing prefixes: the span of turn `i` is
/// what `render(messages[..=i])` adds to `render(messages[..i], add_generation_prompt)`.
pub fn assistant_spans(tok: &ModelTokenizer, messages: &[ChatMessage]) -> Result<(String, Vec<Range<usize>>)> {
    assistant_spans_with_tools(tok, messages, &[])
}

/// [`assistant_spans`] of a conversation rendered with the function schemas `tools` (see
/// [`ChatTemplate::render_messages`]). An assistant turn's tool calls are part of its span; tool
/// results are not. A template that leaves out a tool call or a tool schema (one without tool
/// support) is an error rather than a silent loss of what the model should learn.
pub fn assistant_spans_with_tools(
    tok: &ModelTokenizer,
    messages: &[ChatMessage],
    tools: &[Value],
) -> Result<(String, Vec<Range<usize>>)> {
    let template = tok.chat_template()?;
    let full = template.render_messages(messages, tools, false)?;
    check_tools_rendered(template, &full, tools)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = template.render_messages(&messages[..i], tools, true)?;
        let upto = template.render_messages(&messages[..=i], tools, false)?;
        if !upto.starts_with(&prompt) || !full.starts_with(&upto) {
            bail!(
                "the chat template does not render conversations as growing prefixes (turn {} changes earlier text), so assistant tokens cannot be located; set train_on_prompt = true or use another template",
                i + 1
            );
        }
        if let Some(call) = m.tool_calls.iter().find(|c| !upto[prompt.len()..].contains(&c.name)) {
            bail!(
                "{}: the chat template does not render tool calls (turn {} calls '{}', which is missing from the rendered turn); expected a template with tool support (one that reads message.tool_calls)",
                template.origin(),
                i + 1,
                call.name
            );
        }
        if upto.len() > prompt.len() {
            spans.push(prompt.len()..upto.len());
        }
    }
    Ok((full, spans))
}

/// Every function schema of `tools` must show in the rendered text (by its name): a template
/// without tool support renders none of them.
pub fn check_tools_rendered(template: &ChatTemplate, rendered: &str, tools: &[Value]) -> Result<()> {
    for tool in tools {
        let function = tool.get("function").unwrap_or(tool);
        if let Some(name) = function.get("name").and_then(Value::as_str) {
            if !rendered.contains(name) {
                bail!(
                    "{}: the chat template does not render the tool schemas ('{name}' is missing from the rendered text); expected a template with tool support (one that reads tools)",
                    template.origin()
                );
            }
        }
    }
    Ok(())
}

/// Tokenises a conversation rendered with the chat template. Labels cover every assistant turn
/// (content plus the template's end-of-turn tokens); with `train_on_prompt` every token is labelled.
pub fn encode_conversation(
    tok: &ModelTokenizer,
    messages: &[ChatMessage],
    train_on_prompt: bool,
) -> Result<LabeledTokens> {
    encode_conversation_with_tools(tok, messages, &[], train_on_prompt)
}

/// [`encode_conversation`] with the function schemas `tools` given to the template: labels cover
/// the assistant turns including their tool calls, never the tool results.
pub fn encode_conversation_with_tools(
    tok: &ModelTokenizer,
    messages: &[ChatMessage],
    tools: &[Value],
    train_on_prompt: bool,
) -> Result<LabeledTokens> {
    let (text, spans) = assistant_spans_with_tools(tok, messages, tools)?;
    let enc = tok.inner().encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let input_ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
    let labels = if train_on_prompt {
        input_ids.clone()
    } else {
        input_ids
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(start, end))| {
                // a token belongs to an assistant turn when it starts inside one (zero-width
                // tokens use their end)
                let at = if end > start { start } else { end.saturating_sub(1) };
                if spans.iter().any(|s| s.contains(&at)) {
                    id
                } else {
                    IGNORE_INDEX
                }
            })
            .collect()
    };
    Ok(LabeledTokens { input_ids, labels })
}

/// Keeps the labels of the last contiguous run of labelled tokens (the final assistant turn and
/// its end-of-turn tokens) and clears every earlier one.
pub fn keep_final_turn_labels(seq: &mut LabeledTokens) {
    let Some(end) = seq.labels.iter().rposition(|&l| l != IGNORE_INDEX) else { return };
    let start = seq.labels[..end].iter().rposition(|&l| l == IGNORE_INDEX).map_or(0, |i| i + 1);
    for l in &mut seq.labels[..start] {
        *l = IGNORE_INDEX;
    }
}

/// Tokenises a conversation whose last message is the assistant's answer, with labels on that
/// answer only (content plus the template's end-of-turn tokens): what RM, DPO and PPO score.
pub fn encode_final_answer(tok: &ModelTokenizer, messages: &[ChatMessage]) -> Result<LabeledTokens> {
    match messages.last() {
        Some(m) if m.role == "assistant" => {}
        _ => bail!("expected the conversation to end with the assistant's answer"),
    }
    let mut enc = encode_conversation(tok, messages, false)?;
    keep_final_turn_labels(&mut enc);
    Ok(enc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tok() -> ModelTokenizer {
        ModelTokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-qwen2"))
            .unwrap()
    }

    #[test]
    fn labels_cover_exactly_the_assistant_turns_and_their_end_tokens() {
        let t = tok();
        let msgs = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "What is fever?"),
            ChatMessage::new("assistant", "A high temperature."),
            ChatMessage::new("user", "发烧怎么办？"),
            ChatMessage::new("assistant", "多喝水。"),
        ];
        let enc = encode_conversation(&t, &msgs, false).unwrap();
        assert_eq!(enc.input_ids.len(), enc.labels.len());
        // decoding the labelled tokens gives both answers each followed by the end-of-turn marker
        let labelled: Vec<i64> = enc.labels.iter().copied().filter(|&l| l != IGNORE_INDEX).collect();
        let text = t.decode(&labelled, false).unwrap();
        assert_eq!(text, "A high temperature.<|im_end|>\n多喝水。<|im_end|>\n");
        // nothing of the prompts is labelled
        let unlabelled: Vec<i64> =
            enc.input_ids.iter().zip(&enc.labels).filter(|(_, &l)| l == IGNORE_INDEX).map(|(&i, _)| i).collect();
        let prompt_text = t.decode(&unlabelled, false).unwrap();
        assert!(
            prompt_text.contains("What is fever?")
                && prompt_text.contains("发烧怎么办？")
                && !prompt_text.contains("多喝水")
        );
        let all = encode_conversation(&t, &msgs, true).unwrap();
        assert_eq!(all.labels, all.input_ids);
        // only the final answer
        let last = encode_final_answer(&t, &msgs).unwrap();
        assert_eq!(last.input_ids, enc.input_ids);
        let labelled: Vec<i64> = last.labels.iter().copied().filter(|&l| l != IGNORE_INDEX).collect();
        assert_eq!(t.decode(&labelled, false).unwrap(), "多喝水。<|im_end|>\n");
        assert!(encode_final_answer(&t, &msgs[..4]).is_err());
    }
}
