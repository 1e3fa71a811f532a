//! LLM-as-a-judge, as pure functions of text: the rubric prompts (MT-Bench's single-answer grading
//! and pairwise comparison, or a custom template with `{question}` / `{answer}` placeholders),
//! parsing a judge's reply into a 1–10 rating or an A / B / tie verdict, the position-swap rule
//! of pairwise judging, and the aggregate (mean rating ± standard error, win rate with a 95 %
//! Wilson interval). Which model writes the judgement (a local folder or an OpenAI-compatible
//! endpoint) is the caller's business.
use anyhow::{bail, Result};
use regex::Regex;
use serde::Serialize;

use crate::eval::winrate::wilson_interval;
use crate::text::chat::ChatMessage;

/// What the judge is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeMode {
    /// Rate one answer from 1 to 10.
    Score,
    /// Say which of two answers is better (or a tie).
    Pairwise,
}

impl JudgeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            JudgeMode::Score => "score",
            JudgeMode::Pairwise => "pairwise",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "score" => Ok(JudgeMode::Score),
            "pairwise" => Ok(JudgeMode::Pairwise),
            other => bail!("--mode: expected score or pairwise, found '{other}'"),
        }
    }

    /// The placeholders a rubric of this mode may use; the answer ones are required.
    pub fn placeholders(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            JudgeMode::Score => (&["question", "answer"], &["answer"]),
            JudgeMode::Pairwise => (&["question", "answer_a", "answer_b"], &["answer_a", "answer_b"]),
        }
    }
}

/// MT-Bench's `single-v1` judge prompt (system "You are a helpful assistant.").
pub const SCORE_RUBRIC: &str = "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]";

/// MT-Bench's `pair-v2` system prompt.
pub const PAIRWISE_SYSTEM: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. You should choose the assistant that follows the user's instructions and answers the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the order in which the responses were presented does not influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.";

/// MT-Bench's `pair-v2` user prompt.
pub const PAIRWISE_RUBRIC: &str = "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]";

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Slot(String),
}

/// A judge prompt: an optional system message and a user template.
#[derive(Debug, Clone, PartialEq)]
pub struct Rubric {
    pub mode: JudgeMode,
    system: Option<String>,
    pieces: Vec<Piece>,
}

impl Rubric {
    /// MT-Bench's prompt of `mode`.
    pub fn builtin(mode: JudgeMode) -> Rubric {
        let (system, template) = match mode {
            JudgeMode::Score => ("You are a helpful assistant.", SCORE_RUBRIC),
            JudgeMode::Pairwise => (PAIRWISE_SYSTEM, PAIRWISE_RUBRIC),
        };
        let mut r = Rubric::parse(mode, template, "built-in rubric").expect("the built-in rubrics parse");
        r.system = Some(system.to_string());
        r
    }

    /// A custom template (the whole user message). `{name}` with `name` a placeholder of `mode`
    /// is filled in; `{{` and `}}` are literal braces; any other `{word}` is an error naming
    /// `origin`, and so is a template without the mode's answer placeholders. Braces around
    /// anything but a word (`{"score": 5}`) are text.
    pub fn parse(mode: JudgeMode, template: &str, origin: &str) -> Result<Rubric> {
        let (allowed, required) = mode.placeholders();
        let expected = allowed.iter().map(|p| format!("{{{p}}}")).collect::<Vec<_>>().join(", ");
        let slot = Regex::new(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}").expect("valid regex");
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("{{") || rest.starts_with("}}") {
                text.push(c);
                rest = &rest[2..];
                continue;
            }
            if let Some(m) = slot.captures(rest) {
                let name = m[1].to_string();
                if !allowed.contains(&name.as_str()) {
                    let line = template[..template.len() - rest.len()].matches('\n').count() + 1;
                    bail!("{origin}:{line}: unknown placeholder {{{name}}} (a {} rubric knows {expected}; write {{{{ for a literal brace)", mode.as_str());
                }
                pieces.push(Piece::Text(std::mem::take(&mut text)));
                rest = &rest[m[0].len()..];
                pieces.push(Piece::Slot(name));
                continue;
            }
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
        pieces.push(Piece::Text(text));
        for r in required {
            if !pieces.contains(&Piece::Slot(r.to_string())) {
                bail!(
                    "{origin}: the rubric has no {{{r}}} placeholder (a {} rubric needs {})",
                    mode.as_str(),
                    required.iter().map(|p| format!("{{{p}}}")).collect::<Vec<_>>().join(" and ")
                );
            }
        }
        Ok(Rubric { mode, system: None, pieces })
    }

    /// The judge's messages for one question and its answer(s) (`answers` = [answer] in score
    /// mode, [answer_a, answer_b] in pairwise mode).
    pub fn messages(&self, question: &str, answers: &[&str]) -> Vec<ChatMessage> {
        let mut user = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => user.push_str(t),
                Piece::Slot(name) => user.push_str(match name.as_str() {
                    "question" => question,
                    "answer" | "answer_a" => answers.first().copied().unwrap_or(""),
                    _ => answers.get(1).copied().unwrap_or(""),
                }),
            }
        }
        let mut out = Vec::new();
        if let Some(s) = &self.system {
            out.push(ChatMessage::new("system", s));
        }
        out.push(ChatMessage::new("user", &user));
        out
    }
}

/// The question text of a prompt conversation: the user message when it is the only one (after
/// an optional system message), else every message as `role: content` lines.
pub fn question_text(prompt: &[ChatMessage]) -> String {
    let turns: Vec<&ChatMessage> = prompt.iter().filter(|m| m.role != "system").collect();
    match turns.as_slice() {
        [only] => only.content.clone(),
        _ => prompt.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n"),
    }
}

/// A 1–10 rating in a judge's reply, or None. Tried in order, the last match of the first style
/// found wins (judges give their verdict after their explanation):
/// `[[7]]` (MT-Bench), `[7]` (MT-Bench's fallback), `7/10` / `7 out of 10`, `Rating: 7` /
/// `Score: 7` / `评分：7` / `得分：7` / `分数：7`, `7分`. Ratings outside 1–10 do not count.
pub fn parse_rating(reply: &str) -> Option<f64> {
    const NUM: &str = r"(\d+(?:\.\d+)?)";
    let patterns = [
        format!(r"\[\[\s*{NUM}\s*\]\]"),
        format!(r"\[\s*{NUM}\s*\]"),
        format!(r"{NUM}\s*(?:/|／|out\s+of)\s*10(?:\.0+)?\b"),
        format!(r"(?i)(?:rating|score|grade|评分|得分|分数|打分)\s*(?:is|of|=|:|：)?\s*\**\s*{NUM}"),
        format!(r"{NUM}\s*分"),
    ];
    for p in &patterns {
        let re = Regex::new(p).expect("valid regex");
        let found: Vec<f64> = re.captures_iter(reply).filter_map(|c| c[1].parse::<f64>().ok()).collect();
        if let Some(&x) = found.last() {
            return (1.0..=10.0).contains(&x).then_some(x);
        }
    }
    None
}

/// A pairwise verdict as the judge wrote it (A = the answer shown first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    A,
    B,
    Tie,
}

/// The verdict of a pairwise reply, or None: the last `[[A]]` / `[[B]]` / `[[C]]` (MT-Bench; also
/// `[[tie]]`), else the last `[A]` / `[B]` / `[C]`, else `verdict: A` / `winner: B` /
/// `结论：A`, else "assistant A is better" or "tie" / "平局" alone.
pub fn parse_verdict(reply: &str) -> Option<Verdict> {
    let letter = |s: &str| match s.to_ascii_lowercase().as_str() {
        "a" => Some(Verdict::A),
        "b" => Some(Verdict::B),
        "c" | "tie" => Some(Verdict::Tie),
        _ => None,
    };
    let patterns = [
        r"\[\[\s*([ABCabc]|[Tt]ie|TIE)\s*\]\]",
        r"\[\s*([ABC])\s*\]",
        r"(?i:final\s+verdict|verdict|winner|better\s+(?:answer|response|assistant)|结论|裁决|胜者)\s*(?i:is|:|：)?\s*\**\s*(?i:assistant\s+)?\b([ABC]|(?i:tie))\b",
    ];
    for p in patterns {
        let re = Regex::new(p).expect("valid regex");
        if let Some(v) = re.captures_iter(reply).filter_map(|c| letter(&c[1])).last() {
            return Some(v);
        }
    }
    let better = Regex::new(r"(?i)\bassistant\s+([AB])\s+is\s+better\b|助手\s*([AB])\s*更好").expect("valid regex");
    if let Some(c) = better.captures_iter(reply).last() {
        return letter(c.get(1).or_else(|| c.get(2)).map_or("", |m| m.as_str()));
    }
    let tie = Regex::new(r"(?i)\btie\b|平局|不相上下").expect("valid regex");
    tie.is_match(reply).then_some(Verdict::Tie)
}

/// Model A's result on one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Win,
    Tie,
    Loss,
    /// A judgement (either order in pairwise mode) could not be parsed.
    Unparseable,
}

/// The swap rule: the pair is judged with the model's answer first (`model_first`) and with the
/// baseline's first (`baseline_first`). A win (or loss) needs both orders to agree; any other
/// pair of parsed verdicts — disagreement, or a tie in either order — is a tie. A judgement that
/// cannot be parsed makes the prompt unparseable.
pub fn pairwise_outcome(model_first: Option<Verdict>, baseline_first: Option<Verdict>) -> Outcome {
    match (model_first, baseline_first) {
        (Some(Verdict::A), Some(Verdict::B)) => Outcome::Win,
        (Some(Verdict::B), Some(Verdict::A)) => Outcome::Loss,
        (Some(_), Some(_)) => Outcome::Tie,
        _ => Outcome::Unparseable,
    }
}

/// The outcome of two ratings of the same prompt (equal within 1e-9: a tie).
pub fn score_outcome(model: Option<f64>, baseline: Option<f64>) -> Outcome {
    match (model, baseline) {
        (Some(a), Some(b)) if (a - b).abs() <= 1e-9 => Outcome::Tie,
        (Some(a), Some(b)) if a > b => Outcome::Win,
        (Some(_), Some(_)) => Outcome::Loss,
        _ => Outcome::Unparseable,
    }
}

/// Mean of the parsed ratings with its standard error (sample standard deviation / √n; 0 for
/// one rating).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanScore {
    pub mean: Option<f64>,
    pub stderr: Option<f64>,
    /// Ratings parsed.
    pub n: usize,
    pub unparseable: usize,
}

pub fn mean_score(ratings: &[Option<f64>]) -> MeanScore {
    let parsed: Vec<f64> = ratings.iter().flatten().copied().collect();
    let (n, unparseable) = (parsed.len(), ratings.len() - parsed.len());
    match crate::eval::stats::mean_stderr(&parsed) {
        None => MeanScore { mean: None, stderr: None, n, unparseable },
        Some(m) => MeanScore { mean: Some(m.mean), stderr: Some(m.stderr.unwrap_or(0.0)), n, unparseable },
    }
}

/// Win rate of the model over the baseline from per-prompt outcomes: ties count half,
/// unparseable prompts are left out of the rate and counted; 95 % Wilson interval (None when no
/// prompt was parsed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JudgedWinRate {
    pub win_rate: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub unparseable: usize,
}

pub fn judged_win_rate(outcomes: &[Outcome]) -> JudgedWinRate {
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    let (wins, ties, losses, unparseable) =
        (count(Outcome::Win), count(Outcome::Tie), count(Outcome::Loss), count(Outcome::Unparseable));
    let n = (wins + ties + losses) as f64;
    if n == 0.0 {
        return JudgedWinRate { win_rate: None, ci_low: None, ci_high: None, wins, ties, losses, unparseable };
    }
    let successes = wins as f64 + 0.5 * ties as f64;
    let (lo, hi) = wilson_interval(successes, n, 1.959964);
    JudgedWinRate {
        win_rate: Some(successes / n),
        ci_low: Some(lo),
        ci_high: Some(hi),
        wins,
        ties,
        losses,
        unparseable,
    }
}

/// One judgement: who was judged (`model` / `baseline` in score mode, `model_first` /
/// `baseline_first` in pairwise mode), the judge's reply, and what was read from it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    pub order: &'static str,
    pub raw: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rating: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    pub parsed: bool,
}

/// One prompt, its answers and its judgements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgedPrompt {
    pub index: usize,
    pub question: String,
    pub answer: String,
    pub baseline_answer: Option<String>,
    pub judgements: Vec<Judgement>,
    /// The model against the baseline (None without one).
    pub outcome: Option<Outcome>,
}

/// What a judging run reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JudgeSummary {
    pub mode: JudgeMode,
    pub prompts: usize,
    /// Judge calls made (prompts, ×2 with a baseline).
    pub judgements: usize,
    /// Judge replies nothing could be read from.
    pub unparseable: usize,
    /// Score mode: the model's ratings.
    pub model: Option<MeanScore>,
    /// Score mode with a baseline: the baseline's ratings.
    pub baseline: Option<MeanScore>,
    /// With a baseline: the model's win rate (pairwise: by the swap rule; score: by rating).
    pub win: Option<JudgedWinRate>,
}

/// What writes the judgements: every judge conversation of one order at once → one reply each.
pub type JudgeCall<'a> = dyn FnMut(&[Vec<ChatMessage>]) -> Result<Vec<String>> + 'a;

/// Judges `answers` (and `baseline` answers) to `questions` with `rubric`: `judge` gets every
/// judge conversation at once and returns one reply each. Score mode rates each answer (and each
/// baseline answer; the win rate compares the two ratings); pairwise mode (a baseline needed)
/// judges each pair in both orders and applies `pairwise_outcome`.
pub fn judge_answers(
    judge: &mut JudgeCall,
    rubric: &Rubric,
    questions: &[String],
    answers: &[String],
    baseline: Option<&[String]>,
) -> Result<(JudgeSummary, Vec<JudgedPrompt>)> {
    if answers.len() != questions.len() || baseline.is_some_and(|b| b.len() != questions.len()) {
        bail!("judging needs one answer per question on each side");
    }
    let mode = rubric.mode;
    if mode == JudgeMode::Pairwise && baseline.is_none() {
        bail!("--mode pairwise: needs --baseline (the model the answers are compared with)");
    }
    // each side's judge conversations: score mode [model, baseline?], pairwise [model first, baseline first]
    let orders: Vec<(&'static str, Vec<Vec<ChatMessage>>)> = match (mode, baseline) {
        (JudgeMode::Score, b) => {
            let mut o = vec![("model", questions.iter().zip(answers).map(|(q, a)| rubric.messages(q, &[a])).collect())];
            if let Some(b) = b {
                o.push(("baseline", questions.iter().zip(b).map(|(q, a)| rubric.messages(q, &[a])).collect()));
            }
            o
        }
        (JudgeMode::Pairwise, Some(b)) => vec![
            (
                "model_first",
                questions.iter().zip(answers.iter().zip(b)).map(|(q, (a, b))| rubric.messages(q, &[a, b])).collect(),
            ),
            (
                "baseline_first",
                questions.iter().zip(answers.iter().zip(b)).map(|(q, (a, b))| rubric.messages(q, &[b, a])).collect(),
            ),
        ],
        (JudgeMode::Pairwise, None) => unreachable!("checked above"),
    };
    let mut replies = Vec::with_capacity(orders.len());
    for (order, conversations) in &orders {
        let got = judge(conversations)?;
        if got.len() != conversations.len() {
            bail!("the judge returned {} replies for {} {order} judgements", got.len(), conversations.len());
        }
        replies.push(got);
    }
    let mut records = Vec::with_capacity(questions.len());
    for i in 0..questions.len() {
        let judgements: Vec<Judgement> = orders
            .iter()
            .zip(&replies)
            .map(|((order, _), r)| {
                let raw = r[i].clone();
                let (rating, verdict) = match mode {
                    JudgeMode::Score => (parse_rating(&raw), None),
                    JudgeMode::Pairwise => (None, parse_verdict(&raw)),
                };
                Judgement { order, raw, rating, verdict, parsed: rating.is_some() || verdict.is_some() }
            })
            .collect();
        let outcome = match (mode, judgements.as_slice()) {
            (JudgeMode::Score, [m, b]) => Some(score_outcome(m.rating, b.rating)),
            (JudgeMode::Pairwise, [mf, bf]) => Some(pairwise_outcome(mf.verdict, bf.verdict)),
            _ => None,
        };
        records.push(JudgedPrompt {
            index: i,
            question: questions[i].clone(),
            answer: answers[i].clone(),
            baseline_answer: baseline.map(|b| b[i].clone()),
            judgements,
            outcome,
        });
    }
    let side = |k: usize| -> Vec<Option<f64>> { records.iter().map(|r| r.judgements[k].rating).collect() };
    let outcomes: Vec<Outcome> = records.iter().filter_map(|r| r.outcome).collect();
    let summary = JudgeSummary {
        mode,
        prompts: questions.len(),
        judgements: records.iter().map(|r| r.judgements.len()).sum(),
        unparseable: records.iter().flat_map(|r| &r.judgements).filter(|j| !j.parsed).count(),
        model: (mode == JudgeMode::Score).then(|| mean_score(&side(0))),
        baseline: (mode == JudgeMode::Score && baseline.is_some()).then(|| mean_score(&side(1))),
        win: baseline.is_some().then(|| judged_win_rate(&outcomes)),
    };
    Ok((summary, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_in_many_styles() {
        let cases: [(&str, Option<f64>); 16] = [
            ("The answer is helpful. Rating: [[7]]", Some(7.0)),
            ("Rating: [[ 8.5 ]]", Some(8.5)),
            // the format's own example echoed first, the verdict last
            ("Following \"Rating: [[5]]\" ... my rating: [[9]]", Some(9.0)),
            ("Rating: [6]", Some(6.0)),
            ("I would give it 7/10.", Some(7.0)),
            ("7 / 10", Some(7.0)),
            ("Overall 4 out of 10", Some(4.0)),
            ("Score: 3", Some(3.0)),
            ("**Rating:** 10", Some(10.0)),
            ("The score is 2", Some(2.0)),
            ("评分：8", Some(8.0)),
            ("得分: 6，回答基本正确", Some(6.0)),
            ("我给这个回答打 9分。", Some(9.0)),
            // out of range, or nothing rating-shaped
            ("Rating: [[11]]", None),
            ("The answer mentions 3 symptoms and 2 drugs.", None),
            ("ipsum lorem [[x]]", None),
        ];
        for (reply, expected) in cases {
            assert_eq!(parse_rating(reply), expected, "{reply}");
        }
        assert_eq!(parse_rating("Rating: [[0]]"), None);
    }

    #[test]
    fn verdicts_in_many_styles() {
        let cases: [(&str, Option<Verdict>); 12] = [
            ("Assistant A is more accurate. [[A]]", Some(Verdict::A)),
            ("[[B]]", Some(Verdict::B)),
            ("Both are equal. [[C]]", Some(Verdict::Tie)),
            ("[[tie]]", Some(Verdict::Tie)),
            // the instruction echoed, then the verdict: the last one wins
            ("\"[[A]]\" if A is better, \"[[B]]\" if B is better. Final: [[B]]", Some(Verdict::B)),
            ("My verdict: [A]", Some(Verdict::A)),
            ("Final verdict: B", Some(Verdict::B)),
            ("**Winner:** Assistant A", Some(Verdict::A)),
            ("结论：B", Some(Verdict::B)),
            ("Overall, Assistant B is better.", Some(Verdict::B)),
            ("It is a tie.", Some(Verdict::Tie)),
            ("Both answers discuss fever.", None),
        ];
        for (reply, expected) in cases {
            assert_eq!(parse_verdict(reply), expected, "{reply}");
        }
    }

    #[test]
    fn the_swap_rule_needs_both_orders_to_agree() {
        use Verdict::*;
        // model first: the model is A; baseline first: the model is B
        assert_eq!(pairwise_outcome(Some(A), Some(B)), Outcome::Win);
        assert_eq!(pairwise_outcome(Some(B), Some(A)), Outcome::Loss);
        // position bias: the judge always prefers the first answer → tie
        assert_eq!(pairwise_outcome(Some(A), Some(A)), Outcome::Tie);
        assert_eq!(pairwise_outcome(Some(B), Some(B)), Outcome::Tie);
        assert_eq!(pairwise_outcome(Some(A), Some(Tie)), Outcome::Tie);
        assert_eq!(pairwise_outcome(Some(Tie), Some(Tie)), Outcome::Tie);
        assert_eq!(pairwise_outcome(None, Some(B)), Outcome::Unparseable);
        assert_eq!(pairwise_outcome(Some(A), None), Outcome::Unparseable);
    }

    #[test]
    fn win_rate_counts_ties_half_and_leaves_out_unparseable() {
        use Outcome::*;
        let w = judged_win_rate(&[Win, Win, Tie, Loss, Unparseable]);
        assert_eq!((w.wins, w.ties, w.losses, w.unparseable), (2, 1, 1, 1));
        assert!((w.win_rate.unwrap() - 0.625).abs() < 1e-12);
        let (lo, hi) = wilson_interval(2.5, 4.0, 1.959964);
        assert_eq!((w.ci_low, w.ci_high), (Some(lo), Some(hi)));
        assert_eq!(judged_win_rate(&[Unparseable]).win_rate, None);
        assert_eq!(score_outcome(Some(7.0), Some(5.0)), Win);
        assert_eq!(score_outcome(Some(5.0), Some(5.0)), Tie);
        assert_eq!(score_outcome(Some(5.0), None), Unparseable);
    }

    #[test]
    fn mean_score_with_standard_error() {
        // 6, 8 → mean 7, sample sd √2, stderr √2/√2 = 1
        let m = mean_score(&[Some(6.0), None, Some(8.0)]);
        assert_eq!((m.mean, m.n, m.unparseable), (Some(7.0), 2, 1));
        assert!((m.stderr.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(mean_score(&[None]).mean, None);
        assert_eq!(mean_score(&[Some(3.0)]).stderr, Some(0.0));
    }

    #[test]
    fn rubrics_fill_placeholders_and_refuse_unknown_ones() {
        let r = Rubric::parse(JudgeMode::Score, "Q: {question}\nA: {answer}\nJSON {{\"x\": 1}} {\"y\": 2}", "r.txt")
            .unwrap();
        let m = r.messages("fever?", &["rest"]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].content, "Q: fever?\nA: rest\nJSON {\"x\": 1} {\"y\": 2}");
        let e = Rubric::parse(JudgeMode::Score, "Q: {question}\n{answer} {reference}", "r.txt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.txt:2: unknown placeholder {reference} (a score rubric knows {question}, {answer}; write {{ for a literal brace)"
        );
        let e = Rubric::parse(JudgeMode::Pairwise, "{question} {answer_a}", "p.txt").unwrap_err();
        assert!(e.to_string().starts_with("p.txt: the rubric has no {answer_b} placeholder"), "{e}");
        let p = Rubric::builtin(JudgeMode::Pairwise).messages("q?", &["first", "second"]);
        assert_eq!(p[0].role, "system");
        assert!(p[1].content.contains("[The Start of Assistant A's Answer]\nfirst\n"));
        assert!(p[1].content.contains("[The Start of Assistant B's Answer]\nsecond\n"));
        let s = Rubric::builtin(JudgeMode::Score).messages("q?", &["ans"]);
        assert!(s[1].content.contains("[Question]\nq?\n") && s[1].content.contains("Rating: [[5]]"));
    }

    #[test]
    fn a_pairwise_run_judges_both_orders() {
        let questions = vec!["q1".to_string(), "q2".to_string(), "q3".to_string()];
        let model = vec!["good1".to_string(), "good2".to_string(), "m3".to_string()];
        let base = vec!["bad1".to_string(), "bad2".to_string(), "b3".to_string()];
        // a judge that prefers any answer starting with "good", else always the first shown,
        // and cannot be read on q3 when the baseline is first
        let mut judge = |convs: &[Vec<ChatMessage>]| -> Result<Vec<String>> {
            Ok(convs
                .iter()
                .map(|c| {
                    let u = &c[1].content;
                    let a_pos = u.find("Assistant A's Answer]\n").unwrap();
                    let a_good = u[a_pos..].starts_with("Assistant A's Answer]\ngood");
                    if u.contains("\nb3\n[The End of Assistant A") {
                        "no idea".to_string()
                    } else if u.contains("good") {
                        if a_good {
                            "[[A]]".into()
                        } else {
                            "[[B]]".into()
                        }
                    } else {
                        "[[A]]".into()
                    }
                })
                .collect())
        };
        let rubric = Rubric::builtin(JudgeMode::Pairwise);
        let (s, records) = judge_answers(&mut judge, &rubric, &questions, &model, Some(&base)).unwrap();
        assert_eq!((s.prompts, s.judgements, s.unparseable), (3, 6, 1));
        let w = s.win.unwrap();
        assert_eq!((w.wins, w.ties, w.losses, w.unparseable), (2, 0, 0, 1));
        assert_eq!(w.win_rate, Some(1.0));
        assert_eq!(records[2].outcome, Some(Outcome::Unparseable));
        assert_eq!(records[0].judgements[1].order, "baseline_first");
        assert_eq!(records[0].judgements[1].verdict, Some(Verdict::B));
        let e = judge_answers(&mut judge, &rubric, &questions, &model, None).unwrap_err();
        assert!(e.to_string().contains("needs --baseline"), "{e}");
    }

    #[test]
    fn the_question_is_the_lone_user_turn_or_the_whole_conversation() {
        let one = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Fever?")];
        assert_eq!(question_text(&one), "Fever?");
        let many = [
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello"),
            ChatMessage::new("user", "Fever?"),
        ];
        assert_eq!(question_text(&many), "user: Hi\nassistant: Hello\nuser: Fever?");
    }
}
