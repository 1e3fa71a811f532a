//! The record formats each kind of data accepts, and detecting a file's format from the keys of
//! its first valid record.
use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::DataKind;

/// A record format. Each file has one, detected from its first valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataFormat {
    /// `.txt`, one document per non-empty line.
    TextLines,
    /// `.txt`, the whole file is one document.
    TextFile,
    /// `{"text": …}`.
    JsonText,
    /// `{"conversations": [{"from", "value"}, …], "system_prompt"?}` (ShareGPT / MedicalGPT).
    ShareGpt,
    /// `{"messages": [{"role", "content"}, …]}`.
    OpenAiMessages,
    /// `{"instruction", "input"?, "output", "system"?, "history"?}`.
    Alpaca,
    /// `{"prompt", "completion"}` (strings or message lists).
    PromptCompletion,
    /// `{"conversations": […], "chosen": "…", "rejected": "…"}` (MedicalGPT).
    MedicalGptPairs,
    /// `{"conversations": […], "chosen": {"from", "value"}, "rejected": {"from", "value"}}`.
    LlamaFactoryPairs,
    /// `{"prompt", "chosen", "rejected"}`, each a string or a message list (TRL).
    TrlPairs,
    /// `{"chosen": [messages], "rejected": [messages]}` with a shared prompt (TRL).
    TrlImplicitPairs,
    /// `{"instruction", "input"?, "chosen", "rejected", "system"?, "history"?}`.
    AlpacaPairs,
    /// `{"question", "response_chosen", "response_rejected", "system"?, "history"?}` (MedicalGPT).
    QuestionResponsePairs,
    /// A prompt (`prompt`, `conversations`, `messages` or `instruction`) and `responses` /
    /// `ranked`: answers ordered best first, expanded into preference pairs.
    RankedResponses,
    /// A prompt and `completions`: `[{"response", "overall_score"}]` (UltraFeedback), expanded
    /// into preference pairs by score.
    ScoredCompletions,
    /// `{"prompt": string or messages, "completion"?}`.
    Prompt,
    /// `{"question", "answer"?}` (MedicalGPT GRPO).
    QuestionAnswer,
    /// `{"prompt", "completion", "label": bool}`, prompt and completion strings or message lists
    /// (TRL's unpaired preference format, KTO).
    TrlUnpaired,
}

impl DataFormat {
    /// A stable identifier (used in `--json` output).
    pub fn id(self) -> &'static str {
        match self {
            DataFormat::TextLines => "text_lines",
            DataFormat::TextFile => "text_file",
            DataFormat::JsonText => "json_text",
            DataFormat::ShareGpt => "sharegpt",
            DataFormat::OpenAiMessages => "openai_messages",
            DataFormat::Alpaca => "alpaca",
            DataFormat::PromptCompletion => "prompt_completion",
            DataFormat::MedicalGptPairs => "medicalgpt_pairs",
            DataFormat::LlamaFactoryPairs => "llama_factory_pairs",
            DataFormat::TrlPairs => "trl_pairs",
            DataFormat::TrlImplicitPairs => "trl_implicit_pairs",
            DataFormat::AlpacaPairs => "alpaca_pairs",
            DataFormat::QuestionResponsePairs => "question_response_pairs",
            DataFormat::RankedResponses => "ranked_responses",
            DataFormat::ScoredCompletions => "scored_completions",
            DataFormat::Prompt => "prompt",
            DataFormat::QuestionAnswer => "question_answer",
            DataFormat::TrlUnpaired => "trl_unpaired",
        }
    }

    /// A readable name (used in tables and messages).
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::TextLines => "text, one document per line",
            DataFormat::TextFile => "text, one document per file",
            DataFormat::JsonText => "JSON text",
            DataFormat::ShareGpt => "ShareGPT",
            DataFormat::OpenAiMessages => "OpenAI messages",
            DataFormat::Alpaca => "Alpaca",
            DataFormat::PromptCompletion => "prompt/completion",
            DataFormat::MedicalGptPairs => "MedicalGPT pairs",
            DataFormat::LlamaFactoryPairs => "LLaMA-Factory pairs",
            DataFormat::TrlPairs => "TRL pairs",
            DataFormat::TrlImplicitPairs => "TRL implicit-prompt pairs",
            DataFormat::AlpacaPairs => "Alpaca pairs",
            DataFormat::QuestionResponsePairs => "question/response pairs",
            DataFormat::RankedResponses => "ranked responses",
            DataFormat::ScoredCompletions => "scored completions",
            DataFormat::Prompt => "prompt",
            DataFormat::QuestionAnswer => "question/answer",
            DataFormat::TrlUnpaired => "TRL unpaired",
        }
    }

    /// A format whose one record gives several preference pairs.
    pub fn is_ranked(self) -> bool {
        matches!(self, DataFormat::RankedResponses | DataFormat::ScoredCompletions)
    }

    /// The format of a JSON record of `kind`, from its keys; `None` when no format matches.
    pub fn detect(kind: DataKind, record: &Map<String, Value>) -> Option<DataFormat> {
        let has = |k: &str| record.contains_key(k);
        match kind {
            DataKind::Pretrain => has("text").then_some(DataFormat::JsonText),
            DataKind::Unpaired if has("label") => Some(DataFormat::TrlUnpaired),
            DataKind::Unpaired => DataFormat::detect(DataKind::Preference, record),
            DataKind::Sft => {
                if has("conversations") {
                    Some(DataFormat::ShareGpt)
                } else if has("messages") {
                    Some(DataFormat::OpenAiMessages)
                } else if has("instruction") {
                    Some(DataFormat::Alpaca)
                } else if has("prompt") && has("completion") {
                    Some(DataFormat::PromptCompletion)
                } else {
                    None
                }
            }
            DataKind::Preference => {
                if has("responses") || has("ranked") {
                    Some(DataFormat::RankedResponses)
                } else if has("completions") {
                    Some(DataFormat::ScoredCompletions)
                } else if has("conversations") {
                    if record.get("chosen").is_some_and(Value::is_object) {
                        Some(DataFormat::LlamaFactoryPairs)
                    } else {
                        Some(DataFormat::MedicalGptPairs)
                    }
                } else if has("response_chosen") || has("response_rejected") {
                    Some(DataFormat::QuestionResponsePairs)
                } else if has("instruction") {
                    Some(DataFormat::AlpacaPairs)
                } else if has("prompt") {
                    Some(DataFormat::TrlPairs)
                } else if has("chosen") && has("rejected") {
                    Some(DataFormat::TrlImplicitPairs)
                } else {
                    None
                }
            }
            DataKind::Prompt => {
                if has("prompt") {
                    Some(DataFormat::Prompt)
                } else if has("question") {
                    Some(DataFormat::QuestionAnswer)
                } else if has("conversations") {
                    Some(DataFormat::ShareGpt)
                } else if has("messages") {
                    Some(DataFormat::OpenAiMessages)
                } else if has("instruction") {
                    Some(DataFormat::Alpaca)
                } else {
                    None
                }
            }
        }
    }

    /// What the keys of a record of `kind` must look like (for "no format matches" errors).
    pub fn expected_keys(kind: DataKind) -> &'static str {
        match kind {
            DataKind::Pretrain => "'text'",
            DataKind::Sft => {
                "'conversations' (ShareGPT), 'messages' (OpenAI), 'instruction' + 'output' (Alpaca) or 'prompt' + 'completion'"
            }
            DataKind::Preference => {
                "'chosen' + 'rejected' with 'conversations' (MedicalGPT, LLaMA-Factory), 'prompt' (TRL), 'instruction' (Alpaca) or alone (TRL implicit prompt), 'question' + 'response_chosen' + 'response_rejected', or a prompt with ranked 'responses' / 'ranked' or scored 'completions'"
            }
            DataKind::Prompt => {
                "'prompt', 'question' (+ 'answer'), 'conversations' (ShareGPT), 'messages' (OpenAI) or 'instruction' (Alpaca)"
            }
            DataKind::Unpaired => {
                "'prompt' + 'completion' + 'label' (TRL unpaired), or any preference format (its pairs split into a desirable and an undesirable example)"
            }
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for DataFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.id())
    }
}
