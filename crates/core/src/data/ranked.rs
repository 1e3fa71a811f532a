//! Ranked preference lists: a prompt and K answers ordered best first (`responses` / `ranked`),
//! or scored completions (UltraFeedback's `completions` with `overall_score` / `score`), expanded
//! into preference pairs (all K(K-1)/2 by default, or adjacent / best-vs-rest ones).
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::fields::{
    alpaca_prompt_turns, as_string, check_conversation, required, string_or_messages, system_field, turns, Dialect,
    FieldError, FieldResult, LastTurn, Role,
};
use super::preference::PreferencePair;
use super::sft::{with_system, SHAREGPT_SYSTEM_KEYS};
use super::{kind_name, DataFormat, Origin};
use crate::text::chat::ChatMessage;

/// Which pairs a ranked list of K answers gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankedPairs {
    /// Every answer against every worse one: K(K-1)/2 pairs.
    #[default]
    All,
    /// Each answer against the next one: K-1 pairs.
    Adjacent,
    /// The best answer against each other one: K-1 pairs.
    BestVsRest,
}

/// The (better, worse) positions of a list of `k` answers ranked best first, in the order
/// (0, 1), (0, 2), …, (1, 2), … .
pub fn ranked_pair_indices(k: usize, mode: RankedPairs) -> Vec<(usize, usize)> {
    match mode {
        RankedPairs::All => (0..k).flat_map(|i| (i + 1..k).map(move |j| (i, j))).collect(),
        RankedPairs::Adjacent => (1..k).map(|j| (j - 1, j)).collect(),
        RankedPairs::BestVsRest => (1..k).map(|j| (0, j)).collect(),
    }
}

/// The (better, worse) indices of scored answers: the answers ordered by score, highest first
/// (equal scores keep their order), the pairs of `mode` over that order, less the pairs whose
/// scores are equal (a tie says nothing about which is better).
pub fn scored_pair_indices(scores: &[f64], mode: RankedPairs) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    ranked_pair_indices(order.len(), mode)
        .into_iter()
        .map(|(i, j)| (order[i], order[j]))
        .filter(|&(i, j)| scores[i] > scores[j])
        .collect()
}

/// The prompt of a ranked record: `prompt` (a string or messages), `conversations` (ShareGPT),
/// `messages` (OpenAI) or `instruction` (+ `input`, `history`; Alpaca), ending with a user turn.
fn ranked_prompt(obj: &Map<String, Value>) -> FieldResult<Vec<ChatMessage>> {
    let (prompt_turns, field, system) = if let Some(p) = obj.get("prompt") {
        (string_or_messages(p, "prompt", Role::User)?, "prompt", system_field(obj, &["system"])?)
    } else if let Some(c) = obj.get("conversations") {
        (turns(c, "conversations", Dialect::ShareGpt)?, "conversations", system_field(obj, &SHAREGPT_SYSTEM_KEYS)?)
    } else if let Some(m) = obj.get("messages") {
        (turns(m, "messages", Dialect::OpenAi)?, "messages", None)
    } else if obj.contains_key("instruction") {
        (alpaca_prompt_turns(obj)?, "instruction", system_field(obj, &["system"])?)
    } else {
        return Err(FieldError::new(
            "prompt",
            "missing (expected the prompt of the ranked answers in 'prompt', 'conversations', 'messages' or 'instruction')",
        ));
    };
    let checked = check_conversation(prompt_turns, field, system, LastTurn::User)?;
    Ok(with_system(checked.system.as_deref(), &checked.messages))
}

/// A list field of at least two items.
fn answer_list<'a>(obj: &'a Map<String, Value>, key: &str) -> FieldResult<&'a [Value]> {
    let value = required(obj, key)?;
    let items = value
        .as_array()
        .ok_or_else(|| FieldError::new(key, format!("expected a list of answers, found {}", kind_name(value))))?;
    if items.len() < 2 {
        return Err(FieldError::new(key, format!("expected at least 2 answers to rank, found {}", items.len())));
    }
    Ok(items)
}

/// A scored completion `{"response" (or "text"), "overall_score" (or "score")}`: its text and score.
fn scored_completion(item: &Value, field: &str) -> FieldResult<(String, f64)> {
    let obj = item.as_object().ok_or_else(|| {
        FieldError::new(
            field,
            format!("expected an object with 'response' and 'overall_score', found {}", kind_name(item)),
        )
    })?;
    let text_key = ["response", "text"].into_iter().find(|k| obj.contains_key(*k)).unwrap_or("response");
    let text_field = format!("{field}.{text_key}");
    let text = as_string(obj.get(text_key).ok_or_else(|| FieldError::new(&text_field, "missing"))?, &text_field)?;
    let score_key = ["overall_score", "score"].into_iter().find(|k| obj.contains_key(*k)).unwrap_or("overall_score");
    let score_field = format!("{field}.{score_key}");
    let score = match obj.get(score_key) {
        None => return Err(FieldError::new(score_field, "missing")),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| FieldError::new(&score_field, format!("expected a number, found {}", kind_name(v))))?,
    };
    Ok((text, score))
}

/// The preference pairs of a ranked record, each with the record's origin.
pub(crate) fn parse(
    format: DataFormat,
    obj: &Map<String, Value>,
    origin: Origin,
    mode: RankedPairs,
) -> FieldResult<Vec<PreferencePair>> {
    let (answers, pairs) = match format {
        DataFormat::RankedResponses => {
            let key = if obj.contains_key("responses") { "responses" } else { "ranked" };
            let items = answer_list(obj, key)?;
            let answers = items
                .iter()
                .enumerate()
                .map(|(i, v)| as_string(v, &format!("{key}[{i}]")))
                .collect::<FieldResult<Vec<_>>>()?;
            let pairs = ranked_pair_indices(answers.len(), mode);
            (answers, pairs)
        }
        DataFormat::ScoredCompletions => {
            let items = answer_list(obj, "completions")?;
            let (answers, scores): (Vec<String>, Vec<f64>) = items
                .iter()
                .enumerate()
                .map(|(i, v)| scored_completion(v, &format!("completions[{i}]")))
                .collect::<FieldResult<Vec<_>>>()?
                .into_iter()
                .unzip();
            let pairs = scored_pair_indices(&scores, mode);
            if pairs.is_empty() {
                return Err(FieldError::new(
                    "completions",
                    "expected completions with different scores, found only equal scores (no pair)",
                ));
            }
            (answers, pairs)
        }
        other => return Err(FieldError::new("", format!("{other} is not a ranked format"))),
    };
    let prompt = ranked_prompt(obj)?;
    Ok(pairs
        .into_iter()
        .map(|(better, worse)| PreferencePair {
            prompt: prompt.clone(),
            chosen: answers[better].clone(),
            rejected: answers[worse].clone(),
            origin: origin.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    #[test]
    fn pair_indices_of_each_mode() {
        assert_eq!(ranked_pair_indices(3, RankedPairs::All), vec![(0, 1), (0, 2), (1, 2)]);
        assert_eq!(ranked_pair_indices(4, RankedPairs::All).len(), 6);
        assert_eq!(ranked_pair_indices(4, RankedPairs::Adjacent), vec![(0, 1), (1, 2), (2, 3)]);
        assert_eq!(ranked_pair_indices(4, RankedPairs::BestVsRest), vec![(0, 1), (0, 2), (0, 3)]);
        assert!(ranked_pair_indices(1, RankedPairs::All).is_empty());
    }

    #[test]
    fn scored_pairs_order_by_score_and_skip_ties() {
        // scores 2, 5, 5, 1: order 1, 2, 0, 3 (ties keep their order)
        let s = [2.0, 5.0, 5.0, 1.0];
        assert_eq!(scored_pair_indices(&s, RankedPairs::All), vec![(1, 0), (1, 3), (2, 0), (2, 3), (0, 3)]);
        assert_eq!(scored_pair_indices(&s, RankedPairs::Adjacent), vec![(2, 0), (0, 3)]);
        assert_eq!(scored_pair_indices(&s, RankedPairs::BestVsRest), vec![(1, 0), (1, 3)]);
    }

    fn origin() -> Origin {
        Origin::line(Path::new("r.jsonl"), 7)
    }

    #[test]
    fn a_ranked_list_expands_to_pairs_with_its_origin() {
        let rec = json!({"prompt": "Q", "system": "S", "responses": ["a", "b", "c"]});
        let pairs = parse(DataFormat::RankedResponses, rec.as_object().unwrap(), origin(), RankedPairs::All).unwrap();
        let got: Vec<(&str, &str)> = pairs.iter().map(|p| (p.chosen.as_str(), p.rejected.as_str())).collect();
        assert_eq!(got, vec![("a", "b"), ("a", "c"), ("b", "c")]);
        assert!(pairs.iter().all(|p| p.origin.to_string() == "r.jsonl:7"));
        assert_eq!(pairs[0].prompt[0].role, "system");
        assert_eq!(pairs[0].prompt[1].content, "Q");
        let rec = json!({"conversations": [{"from": "human", "value": "Q"}], "ranked": ["a", "b", "c"]});
        let pairs =
            parse(DataFormat::RankedResponses, rec.as_object().unwrap(), origin(), RankedPairs::Adjacent).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[1].chosen.as_str(), pairs[1].rejected.as_str()), ("b", "c"));
    }

    #[test]
    fn scored_completions_expand_by_score() {
        let rec = json!({"instruction": "Q", "completions": [
            {"response": "ok", "overall_score": 6.5},
            {"response": "best", "overall_score": 9},
            {"response": "bad", "overall_score": 2}
        ]});
        let pairs = parse(DataFormat::ScoredCompletions, rec.as_object().unwrap(), origin(), RankedPairs::All).unwrap();
        let got: Vec<(&str, &str)> = pairs.iter().map(|p| (p.chosen.as_str(), p.rejected.as_str())).collect();
        assert_eq!(got, vec![("best", "ok"), ("best", "bad"), ("ok", "bad")]);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |rec: Value, format| {
            parse(format, rec.as_object().unwrap(), origin(), RankedPairs::All).unwrap_err().to_string()
        };
        assert_eq!(
            err(json!({"prompt": "Q", "responses": ["only"]}), DataFormat::RankedResponses),
            "field 'responses': expected at least 2 answers to rank, found 1"
        );
        assert_eq!(
            err(json!({"prompt": "Q", "responses": ["a", 3]}), DataFormat::RankedResponses),
            "field 'responses[1]': expected a string, found a number"
        );
        assert_eq!(
            err(json!({"responses": ["a", "b"]}), DataFormat::RankedResponses),
            "field 'prompt': missing (expected the prompt of the ranked answers in 'prompt', 'conversations', 'messages' or 'instruction')"
        );
        assert_eq!(
            err(
                json!({"prompt": "Q", "completions": [{"response": "a", "overall_score": "high"}, {"response": "b", "overall_score": 1}]}),
                DataFormat::ScoredCompletions
            ),
            "field 'completions[0].overall_score': expected a number, found a string"
        );
        assert_eq!(
            err(
                json!({"prompt": "Q", "completions": [{"response": "a", "score": 1}, {"response": "b", "score": 1}]}),
                DataFormat::ScoredCompletions
            ),
            "field 'completions': expected completions with different scores, found only equal scores (no pair)"
        );
    }
}
