//! Prompts of multiple-choice items rendered exactly as lm-evaluation-harness (0.4) renders its
//! tasks of the same name: the subject's description, k solved examples from the dev split
//! (`first_n`), the question with its lettered options and the answer cue; the continuation
//! scored is the target delimiter plus the option's letter. With a chat template the description
//! is the system message, each solved example a user turn and an assistant turn (the letter), the
//! question the last user turn (lm-eval's `--apply_chat_template` with its default
//! `fewshot_as_multiturn`), continued by the bare letter.
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::{bail, Result};

use super::items::{choice_label, ChoiceItem};
use crate::text::chat::ChatMessage;
use crate::text::tokenizer::ModelTokenizer;

/// An lm-eval task family whose prompt layout items are rendered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceTemplate {
    /// `mmlu_*`: "The following are multiple choice questions (with answers) about …", cue `Answer:`.
    Mmlu,
    /// `cmmlu_*`: "以下是关于…的单项选择题，请直接给出正确答案的选项。", cue `答案：`.
    Cmmlu,
    /// `ceval-valid_*`: "以下是中国关于…的单项选择题，请选出其中的正确答案。", cue `答案：`.
    Ceval,
    /// `medqa_4options`: no description, `Question: …` and cue `Answer:`.
    Medqa,
}

impl FromStr for ChoiceTemplate {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "mmlu" => ChoiceTemplate::Mmlu,
            "cmmlu" => ChoiceTemplate::Cmmlu,
            "ceval" => ChoiceTemplate::Ceval,
            "medqa" => ChoiceTemplate::Medqa,
            other => bail!("template: expected one of mmlu, cmmlu, ceval, medqa, found '{other}'"),
        })
    }
}

/// lm-eval's task descriptions by template and subject (`dataset_name`), read from its task YAML
/// files by `tests/reference/make_choice_subjects.py`.
fn known_descriptions() -> &'static BTreeMap<String, BTreeMap<String, String>> {
    static TABLE: OnceLock<BTreeMap<String, BTreeMap<String, String>>> = OnceLock::new();
    TABLE.get_or_init(|| serde_json::from_str(include_str!("subjects.json")).unwrap_or_default())
}

impl ChoiceTemplate {
    pub fn as_str(self) -> &'static str {
        match self {
            ChoiceTemplate::Mmlu => "mmlu",
            ChoiceTemplate::Cmmlu => "cmmlu",
            ChoiceTemplate::Ceval => "ceval",
            ChoiceTemplate::Medqa => "medqa",
        }
    }

    /// The task description of a subject: lm-eval's own for its subjects, else the same sentence
    /// with the subject's name in it (underscores read as spaces).
    pub fn description(self, subject: &str) -> String {
        if let Some(d) = known_descriptions().get(self.as_str()).and_then(|t| t.get(subject)) {
            return d.clone();
        }
        let name = subject.replace('_', " ");
        match self {
            ChoiceTemplate::Mmlu => {
                format!("The following are multiple choice questions (with answers) about {name}.\n\n")
            }
            ChoiceTemplate::Cmmlu => format!("以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"),
            ChoiceTemplate::Ceval => format!("以下是中国关于{name}的单项选择题，请选出其中的正确答案。\n\n"),
            ChoiceTemplate::Medqa => String::new(),
        }
    }

    /// `doc_to_text`: the question and its options, ending in the answer cue.
    pub fn question_text(self, item: &ChoiceItem) -> String {
        let mut s = String::new();
        match self {
            ChoiceTemplate::Medqa => {
                s.push_str("Question: ");
                s.push_str(&item.question);
                s.push('\n');
                for (i, c) in item.choices.iter().enumerate() {
                    s.push_str(&format!("{}. {c}\n", choice_label(i)));
                }
                s.push_str("Answer:");
            }
            _ => {
                s.push_str(item.question.trim());
                for (i, c) in item.choices.iter().enumerate() {
                    s.push_str(&format!("\n{}. {c}", choice_label(i)));
                }
                s.push_str(if self == ChoiceTemplate::Mmlu { "\nAnswer:" } else { "\n答案：" });
            }
        }
        s
    }
}

/// lm-eval's task settings: the delimiter between a question and its answer, and between examples.
pub const TARGET_DELIMITER: &str = " ";
pub const FEWSHOT_DELIMITER: &str = "\n\n";

/// The context an item is scored in and the delimiter put before each option's letter.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoicePrompt {
    pub context: String,
    pub delimiter: String,
}

impl ChoicePrompt {
    /// The continuations scored: delimiter + letter of each option.
    pub fn continuations(&self, item: &ChoiceItem) -> Vec<String> {
        (0..item.choices.len()).map(|i| format!("{}{}", self.delimiter, choice_label(i))).collect()
    }
}

/// The prompt of `item` with `shots` solved examples before it (lm-eval's `fewshot_context`);
/// through `chat`'s chat template (generation prompt added) when given.
pub fn render_prompt(
    template: ChoiceTemplate,
    item: &ChoiceItem,
    shots: &[&ChoiceItem],
    chat: Option<&ModelTokenizer>,
) -> Result<ChoicePrompt> {
    let description = template.description(&item.subject);
    match chat {
        None => {
            let mut context = description;
            for s in shots {
                context.push_str(&template.question_text(s));
                context.push_str(TARGET_DELIMITER);
                context.push_str(&choice_label(s.answer));
                context.push_str(FEWSHOT_DELIMITER);
            }
            context.push_str(&template.question_text(item));
            Ok(ChoicePrompt { context, delimiter: TARGET_DELIMITER.to_string() })
        }
        Some(tok) => {
            // lm-eval's default with a chat template: the examples as turns (fewshot_as_multiturn)
            let mut messages = Vec::new();
            if !description.is_empty() {
                messages.push(ChatMessage::new("system", &description));
            }
            for s in shots {
                messages.push(ChatMessage::new("user", &template.question_text(s)));
                messages.push(ChatMessage::new("assistant", &choice_label(s.answer)));
            }
            messages.push(ChatMessage::new("user", &template.question_text(item)));
            // lm-eval continues a chat prompt with the bare letter (no gen_prefix)
            Ok(ChoicePrompt { context: tok.apply_chat_template(&messages, true)?, delimiter: String::new() })
        }
    }
}

/// lm-eval's `_encode_pair` for a causal model, for every option of one context: trailing
/// whitespace of the context moves to the continuation, `context + continuation` is encoded whole
/// and the continuation is what follows the context's own tokens. The context (the same for every
/// option) is encoded once. Texts are encoded as `tokenizer.encode` does by default (special
/// tokens added, unless the text already starts with the BOS — or, without one, EOS — token).
pub fn encode_options(
    tok: &ModelTokenizer,
    context: &str,
    continuations: &[String],
) -> Result<(Vec<i64>, Vec<Vec<i64>>)> {
    if context.is_empty() {
        bail!("an item's context is empty");
    }
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let ctx = lm_eval_encode(tok, trimmed)?;
    let mut conts = Vec::with_capacity(continuations.len());
    for c in continuations {
        let continuation = format!("{moved}{c}");
        let whole = lm_eval_encode(tok, &format!("{trimmed}{continuation}"))?;
        let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
        if cont.is_empty() {
            bail!("the continuation {continuation:?} adds no token to its context");
        }
        conts.push(cont);
    }
    Ok((ctx, conts))
}

/// `tok_encode` of lm-eval's HF model: special tokens added unless the text starts with the
/// prefix token (BOS, else EOS).
pub fn lm_eval_encode(tok: &ModelTokenizer, text: &str) -> Result<Vec<i64>> {
    let prefix = tok.bos_token_id.or_else(|| tok.eos_token_ids.first().copied());
    let starts_with_prefix = match prefix {
        Some(id) => {
            let s = tok.decode(&[id], false)?;
            !s.is_empty() && text.starts_with(&s)
        }
        None => false,
    };
    tok.encode(text, !starts_with_prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Origin;
    use std::path::Path;

    fn item(subject: &str, q: &str, answer: usize) -> ChoiceItem {
        ChoiceItem {
            subject: subject.into(),
            question: q.into(),
            choices: vec!["w".into(), "x".into(), "y".into(), "z".into()],
            answer,
            origin: Origin::line(Path::new("f.jsonl"), 1),
        }
    }

    #[test]
    fn renders_lm_eval_layouts() {
        let shot = item("anatomy", " Shot? ", 1);
        let it = item("anatomy", "Which?\n", 0);
        let p = render_prompt(ChoiceTemplate::Mmlu, &it, &[&shot], None).unwrap();
        assert_eq!(
            p.context,
            "The following are multiple choice questions (with answers) about anatomy.\n\nShot?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\nWhich?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
        );
        assert_eq!(p.continuations(&it), vec![" A", " B", " C", " D"]);
        let p = render_prompt(ChoiceTemplate::Cmmlu, &item("clinical_knowledge", "问题", 0), &[], None).unwrap();
        assert_eq!(
            p.context,
            "以下是关于临床知识的单项选择题，请直接给出正确答案的选项。\n\n问题\nA. w\nB. x\nC. y\nD. z\n答案："
        );
        let p = render_prompt(ChoiceTemplate::Ceval, &item("my_subject", "问题", 0), &[], None).unwrap();
        assert!(p.context.starts_with("以下是中国关于my subject的单项选择题"), "{}", p.context);
        let p = render_prompt(ChoiceTemplate::Medqa, &item("medqa", "Q", 0), &[], None).unwrap();
        assert_eq!(p.context, "Question: Q\nA. w\nB. x\nC. y\nD. z\nAnswer:");
        assert!("xmmlu".parse::<ChoiceTemplate>().is_err());
    }
}
