//! What scores a completion in the policy-optimisation stages: a reward model (full folder or
//! LoRA adapter, loaded frozen — PPO's and GRPO's one loader), rule-based reward functions that
//! need no model (`format`, `accuracy`, `length`, `overlong`, `keywords`), and an external
//! command that reads JSON lines on stdin and prints one number per line. GRPO weights and sums
//! them; every rule is a pure, deterministic function of the completion and the record.
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde::Deserialize;
use tch::{Device, Kind};

use align_core::eval::winrate::score_answers;
use align_core::load::spec::ModelSpec;
use align_core::model::scalar::LoadedScalarModel;
use align_core::text::chat::ChatMessage;
use align_core::train::config::LoadedConfig;
use align_core::ModelTokenizer;

use crate::grpo_loss::soft_overlong_punishment;

/// Loads the reward model of a stage (`[<stage>] reward_model`): a `*ForSequenceClassification`
/// folder, or a LoRA reward model's adapter folder merged into its base; every weight frozen.
pub fn load_reward_model(
    cfg: &LoadedConfig,
    dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<(LoadedScalarModel, ModelTokenizer)> {
    let (mut reward, tokenizer) = ModelSpec::at(dir, None, device, kind)
        .scalar_model()
        .with_context(|| format!("{}: [{}] reward_model", cfg.origin.display(), cfg.stage_name))?;
    reward.vs.freeze();
    Ok((reward, tokenizer))
}

/// Which rule a `[[<stage>.rewards]]` entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// 1 when the completion matches `pattern` (a regex; `.` matches newlines), else 0.
    Format,
    /// 1 when the completion's answer equals the record's reference answer (`mode`), else 0.
    Accuracy,
    /// 1 when the completion has `min ..= max` tokens, else 0.
    Length,
    /// DAPO's soft overlong punishment: 0 up to `max_completion_length − buffer` tokens, falling
    /// linearly to −1 at `max_completion_length`.
    Overlong,
    /// The share of `keywords` that occur in the completion (case-insensitive).
    Keywords,
}

/// How `accuracy` compares the answer with the reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccuracyMode {
    /// `numeric` when the reference is a number, `choice` when it is one letter, else `exact`.
    #[default]
    Auto,
    /// Equal after normalisation (case, white space, surrounding punctuation).
    Exact,
    /// The last number of the answer equals the reference's (relative tolerance 1e-6).
    Numeric,
    /// The answer's choice letter (A–J) is the reference's.
    Choice,
    /// The normalised reference occurs in the normalised answer.
    Contains,
}

/// One `[[<stage>.rewards]]` entry as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    #[serde(rename = "type")]
    pub kind: RuleKind,
    /// Metric name (`rewards/<name>/mean`); default: the type.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub weight: Option<f64>,
    /// `format`: the regex (default `^<think>.*?</think>\s*<answer>.*?</answer>$`).
    #[serde(default)]
    pub pattern: Option<String>,
    /// `accuracy`: how to compare.
    #[serde(default)]
    pub mode: Option<AccuracyMode>,
    /// `length`: the target range in completion tokens.
    #[serde(default)]
    pub min: Option<usize>,
    #[serde(default)]
    pub max: Option<usize>,
    /// `overlong`: the soft-punishment buffer in tokens.
    #[serde(default)]
    pub buffer: Option<usize>,
    /// `keywords`: the words looked for.
    #[serde(default)]
    pub keywords: Option<Vec<String>>,
}

pub const DEFAULT_FORMAT: &str = r"^<think>.*?</think>\s*<answer>.*?</answer>$";

/// A rule ready to score.
#[derive(Debug, Clone)]
pub enum Rule {
    Format(Regex),
    Accuracy(AccuracyMode),
    Length { min: usize, max: usize },
    Overlong { max: usize, buffer: usize },
    Keywords(Vec<String>),
}

/// A named, weighted rule.
#[derive(Debug, Clone)]
pub struct WeightedRule {
    pub name: String,
    pub weight: f64,
    pub rule: Rule,
}

impl RewardSpec {
    /// Checks that the entry sets exactly the keys its type reads and compiles it; errors name
    /// `at` (`[grpo] rewards[2]`) and the key.
    pub fn compile(&self, at: &str, max_completion_length: usize) -> Result<WeightedRule> {
        let given: [(&str, bool); 6] = [
            ("pattern", self.pattern.is_some()),
            ("mode", self.mode.is_some()),
            ("min", self.min.is_some()),
            ("max", self.max.is_some()),
            ("buffer", self.buffer.is_some()),
            ("keywords", self.keywords.is_some()),
        ];
        let reads: &[&str] = match self.kind {
            RuleKind::Format => &["pattern"],
            RuleKind::Accuracy => &["mode"],
            RuleKind::Length => &["min", "max"],
            RuleKind::Overlong => &["buffer"],
            RuleKind::Keywords => &["keywords"],
        };
        let type_name = self.type_name();
        for (key, set) in given {
            if set && !reads.contains(&key) {
                bail!("{at}.{key}: a {type_name} reward does not read it (it reads {})", reads.join(", "));
            }
        }
        let weight = self.weight.unwrap_or(1.0);
        if !weight.is_finite() {
            bail!("{at}.weight: must be a finite number, got {weight}");
        }
        let rule = match self.kind {
            RuleKind::Format => {
                let pattern = self.pattern.as_deref().unwrap_or(DEFAULT_FORMAT);
                let re = regex::RegexBuilder::new(pattern)
                    .dot_matches_new_line(true)
                    .build()
                    .map_err(|e| anyhow!("{at}.pattern: not a valid regex: {e}"))?;
                Rule::Format(re)
            }
            RuleKind::Accuracy => Rule::Accuracy(self.mode.unwrap_or_default()),
            RuleKind::Length => {
                let (min, max) = (self.min.unwrap_or(0), self.max.unwrap_or(usize::MAX));
                if self.min.is_none() && self.max.is_none() {
                    bail!("{at}: a length reward needs min, max or both");
                }
                if min > max {
                    bail!("{at}.min: {min} is above max {max}");
                }
                Rule::Length { min, max }
            }
            RuleKind::Overlong => {
                let buffer = self.buffer.ok_or_else(|| {
                    anyhow!("{at}.buffer: missing (tokens before max_completion_length where the punishment starts)")
                })?;
                if buffer == 0 || buffer > max_completion_length {
                    bail!(
                        "{at}.buffer: must be in 1 ..= max_completion_length ({max_completion_length}), got {buffer}"
                    );
                }
                Rule::Overlong { max: max_completion_length, buffer }
            }
            RuleKind::Keywords => {
                let words = self.keywords.clone().unwrap_or_default();
                if words.is_empty() || words.iter().any(|w| w.trim().is_empty()) {
                    bail!("{at}.keywords: expected a non-empty list of non-empty words");
                }
                Rule::Keywords(words.iter().map(|w| w.to_lowercase()).collect())
            }
        };
        Ok(WeightedRule { name: self.name.clone().unwrap_or_else(|| type_name.to_string()), weight, rule })
    }

    fn type_name(&self) -> &'static str {
        match self.kind {
            RuleKind::Format => "format",
            RuleKind::Accuracy => "accuracy",
            RuleKind::Length => "length",
            RuleKind::Overlong => "overlong",
            RuleKind::Keywords => "keywords",
        }
    }
}

/// What a rule sees of one completion.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    pub completion: &'a str,
    /// Completion tokens (the stopping eos included).
    pub tokens: usize,
    pub reference: Option<&'a str>,
}

impl Rule {
    /// The rule's reward of one completion. `accuracy` needs the reference (checked at start-up).
    pub fn score(&self, c: &Scored) -> f64 {
        let hit = |b: bool| if b { 1.0 } else { 0.0 };
        match self {
            Rule::Format(re) => hit(re.is_match(c.completion)),
            Rule::Accuracy(mode) => hit(c.reference.is_some_and(|r| answer_matches(c.completion, r, *mode))),
            Rule::Length { min, max } => hit((*min..=*max).contains(&c.tokens)),
            Rule::Overlong { max, buffer } => soft_overlong_punishment(c.tokens, *max, *buffer),
            Rule::Keywords(words) => {
                let text = c.completion.to_lowercase();
                words.iter().filter(|w| text.contains(w.as_str())).count() as f64 / words.len() as f64
            }
        }
    }

    pub fn needs_reference(&self) -> bool {
        matches!(self, Rule::Accuracy(_))
    }
}

/// The part of a completion that holds its answer: the last `<answer>…</answer>`, else the last
/// `\boxed{…}`, else the text after a GSM8K-style `####`, else the whole completion.
pub fn extract_answer(completion: &str) -> &str {
    if let Some(end) = completion.rfind("</answer>") {
        if let Some(start) = completion[..end].rfind("<answer>") {
            return &completion[start + "<answer>".len()..end];
        }
    }
    if let Some(start) = completion.rfind("\\boxed{") {
        let body = &completion[start + "\\boxed{".len()..];
        let mut depth = 1;
        for (i, ch) in body.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return &body[..i];
                    }
                }
                _ => {}
            }
        }
    }
    if let Some(pos) = completion.rfind("####") {
        return &completion[pos + 4..];
    }
    completion
}

/// Lower case, white space collapsed, surrounding punctuation, quotes and `$` removed.
pub fn normalize_answer(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let edge = |c: char| c.is_ascii_punctuation() || "。，！？；：“”‘’「」（）".contains(c);
    collapsed.trim_matches(edge).trim().to_string()
}

/// Every number in `s` (thousands separators removed), in order.
fn numbers(s: &str) -> Vec<f64> {
    let cleaned = s.replace(',', "");
    let re = number_regex();
    re.find_iter(&cleaned).filter_map(|m| m.as_str().parse::<f64>().ok()).collect()
}

fn number_regex() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| Regex::new(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?").expect("valid regex"))
}

/// A reference that is one number (`42`, `-3.5`, `1,000`, `$12`, `50%`).
fn reference_number(reference: &str) -> Option<f64> {
    let n = normalize_answer(extract_answer(reference));
    let n = n.trim_start_matches('$').trim_end_matches('%').replace(',', "");
    n.trim().parse::<f64>().ok()
}

/// A choice letter `a`–`j` of a normalised string: the string itself (`b`, `(b)`, `b)`), or the
/// letter after "answer is" / "option" / "choice", or the first parenthesised letter.
fn choice_letter(s: &str) -> Option<char> {
    let n = normalize_answer(s);
    let single = |t: &str| {
        let mut cs = t.chars();
        match (cs.next(), cs.next()) {
            (Some(c), None) if ('a'..='j').contains(&c) => Some(c),
            _ => None,
        }
    };
    if let Some(c) = single(n.trim_matches(|c: char| c == '(' || c == ')' || c == '.')) {
        return Some(c);
    }
    static RE: std::sync::OnceLock<(Regex, Regex)> = std::sync::OnceLock::new();
    let (stated, bracketed) = RE.get_or_init(|| {
        (
            Regex::new(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([a-j])\)?(?:[^a-z]|$)").expect("valid regex"),
            Regex::new(r"\(([a-j])\)").expect("valid regex"),
        )
    });
    stated
        .captures(&n)
        .or_else(|| bracketed.captures(&n))
        .and_then(|c| c.get(1))
        .and_then(|m| m.as_str().chars().next())
}

/// Does the completion's answer match the reference under `mode`?
pub fn answer_matches(completion: &str, reference: &str, mode: AccuracyMode) -> bool {
    let answer = extract_answer(completion);
    let mode = match mode {
        AccuracyMode::Auto if reference_number(reference).is_some() => AccuracyMode::Numeric,
        AccuracyMode::Auto if choice_letter(reference).is_some() && normalize_answer(reference).len() <= 3 => {
            AccuracyMode::Choice
        }
        AccuracyMode::Auto => AccuracyMode::Exact,
        m => m,
    };
    match mode {
        AccuracyMode::Numeric => match (reference_number(reference), numbers(answer).last()) {
            (Some(want), Some(&got)) => (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            _ => false,
        },
        AccuracyMode::Choice => choice_letter(reference).is_some_and(|want| choice_letter(answer) == Some(want)),
        AccuracyMode::Contains => {
            let want = normalize_answer(extract_answer(reference));
            !want.is_empty() && normalize_answer(answer).contains(&want)
        }
        AccuracyMode::Exact | AccuracyMode::Auto => {
            normalize_answer(answer) == normalize_answer(extract_answer(reference))
        }
    }
}

/// An external reward program: reads one JSON object a line on stdin
/// (`{"prompt", "completion", "reference"}`), prints one number a line on stdout.
#[derive(Debug, Clone)]
pub struct RewardCommand {
    pub command: String,
    pub timeout: Duration,
}

/// One line of the command's input.
pub struct CommandInput<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    pub reference: Option<&'a str>,
}

impl RewardCommand {
    /// Runs the command (through `sh -c`) on `inputs`; errors name the command and, for bad
    /// output, the line.
    pub fn score(&self, inputs: &[CommandInput]) -> Result<Vec<f64>> {
        let mut stdin = String::new();
        for i in inputs {
            let line = serde_json::json!({"prompt": i.prompt, "completion": i.completion, "reference": i.reference});
            stdin.push_str(&line.to_string());
            stdin.push('\n');
        }
        let cmd = &self.command;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("reward_command `{cmd}`: cannot start"))?;
        let mut pipe = child.stdin.take().ok_or_else(|| anyhow!("reward_command `{cmd}`: no stdin"))?;
        let writer = std::thread::spawn(move || {
            // a command that exits without reading its input is reported by its output check
            let _ = pipe.write_all(stdin.as_bytes());
        });
        let mut out = child.stdout.take().ok_or_else(|| anyhow!("reward_command `{cmd}`: no stdout"))?;
        let mut err = child.stderr.take().ok_or_else(|| anyhow!("reward_command `{cmd}`: no stderr"))?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "reward_command `{cmd}`: no answer within reward_command_timeout = {} s for {} completions",
                    self.timeout.as_secs_f64(),
                    inputs.len()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = writer.join();
        let stdout = reader.join().map_err(|_| anyhow!("reward_command `{cmd}`: reading stdout failed"))?;
        let stderr = err_reader.join().unwrap_or_default();
        if !status.success() {
            let tail: String =
                stderr.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            bail!(
                "reward_command `{cmd}`: exited with {status}{}",
                if tail.is_empty() { String::new() } else { format!(": {tail}") }
            );
        }
        parse_command_output(cmd, &stdout, inputs.len())
    }
}

/// One finite number per line, exactly `expected` lines (blank lines at the end ignored).
pub fn parse_command_output(cmd: &str, stdout: &str, expected: usize) -> Result<Vec<f64>> {
    let lines: Vec<&str> = stdout.trim_end().lines().collect();
    let lines = if stdout.trim().is_empty() { Vec::new() } else { lines };
    if lines.len() != expected {
        bail!(
            "reward_command `{cmd}`: printed {} line(s) for {expected} completions (expected one number per line)",
            lines.len()
        );
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| match l.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => bail!("reward_command `{cmd}`: output line {}: expected a finite number, found {:?}", i + 1, l),
        })
        .collect()
}

/// Every reward of a stage: rules, a reward model, a command — each named, weighted.
pub struct RewardFunctions {
    pub rules: Vec<WeightedRule>,
    pub model: Option<(LoadedScalarModel, ModelTokenizer, f64)>,
    pub command: Option<(RewardCommand, f64)>,
}

/// One completion to score, with its prompt.
pub struct Completion<'a> {
    pub messages: &'a [ChatMessage],
    pub prompt_text: &'a str,
    pub text: &'a str,
    pub tokens: usize,
    pub reference: Option<&'a str>,
}

pub const MODEL_REWARD: &str = "reward_model";
pub const COMMAND_REWARD: &str = "reward_command";

impl RewardFunctions {
    /// `(name, weight)` of every reward function, in scoring order.
    pub fn names(&self) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = Vec::new();
        if let Some((_, _, w)) = &self.model {
            v.push((MODEL_REWARD.into(), *w));
        }
        if let Some((_, w)) = &self.command {
            v.push((COMMAND_REWARD.into(), *w));
        }
        v.extend(self.rules.iter().map(|r| (r.name.clone(), r.weight)));
        v
    }

    /// Each function's rewards of `completions` (in [`Self::names`] order).
    pub fn score(&self, completions: &[Completion], batch_size: usize) -> Result<Vec<Vec<f64>>> {
        let mut per = Vec::new();
        if let Some((rm, tok, _)) = &self.model {
            let convs: Vec<Vec<ChatMessage>> = completions.iter().map(|c| c.messages.to_vec()).collect();
            let answers: Vec<String> = completions.iter().map(|c| c.text.to_string()).collect();
            let max = rm.rm.config.max_position_embeddings.max(1) as usize;
            per.push(score_answers(&rm.rm, tok, &convs, &answers, max, batch_size)?);
        }
        if let Some((cmd, _)) = &self.command {
            let inputs: Vec<CommandInput> = completions
                .iter()
                .map(|c| CommandInput { prompt: c.prompt_text, completion: c.text, reference: c.reference })
                .collect();
            per.push(cmd.score(&inputs)?);
        }
        for r in &self.rules {
            per.push(
                completions
                    .iter()
                    .map(|c| r.rule.score(&Scored { completion: c.text, tokens: c.tokens, reference: c.reference }))
                    .collect(),
            );
        }
        Ok(per)
    }
}

/// `Σ_f weight_f · reward_f` per completion.
pub fn weighted_sum(per_function: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let n = per_function.first().map_or(0, Vec::len);
    (0..n).map(|i| per_function.iter().zip(weights).map(|(r, w)| w * r[i]).sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> RewardSpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn accuracy_modes_by_hand() {
        use AccuracyMode::*;
        assert!(answer_matches("<think>2+2</think><answer> 4 </answer>", "4", Auto));
        assert!(answer_matches("so the total is 1,250.", "1250", Auto));
        assert!(!answer_matches("it is 12 or 13", "12", Auto), "the last number counts");
        assert!(answer_matches("The answer is \\boxed{\\frac{1}{2}} ", "\\frac{1}{2}", Exact));
        assert!(answer_matches("#### 72", "Natalia sold 48 + 24 = 72 clips.\n#### 72", Auto));
        assert!(answer_matches("I think the answer is (B).", "B", Auto));
        assert!(answer_matches("b", "(B)", Choice));
        assert!(!answer_matches("The answer is C", "B", Auto));
        assert!(answer_matches("  Cognitive Behavioral therapy. ", "cognitive behavioral therapy", Auto));
        assert!(!answer_matches("behavioral therapy", "cognitive behavioral therapy", Exact));
        assert!(answer_matches(
            "try cognitive behavioral therapy (CBT) first",
            "Cognitive behavioral therapy",
            Contains
        ));
        assert!(!answer_matches("anything", "", Contains));
    }

    #[test]
    fn rules_score_and_check_their_keys() {
        let c = |text: &'static str, tokens| Scored { completion: text, tokens, reference: Some("7") };
        let f = spec("type = \"format\"").compile("[grpo] rewards[0]", 32).unwrap();
        assert_eq!(f.name, "format");
        assert_eq!(f.rule.score(&c("<think>a\nb</think>\n<answer>7</answer>", 5)), 1.0);
        assert_eq!(f.rule.score(&c("<answer>7</answer>", 5)), 0.0);
        let k = spec("type = \"keywords\"\nkeywords = [\"Rest\", \"fluids\"]\nname = \"kw\"\nweight = 0.5")
            .compile("x", 32)
            .unwrap();
        assert_eq!((k.name.as_str(), k.weight), ("kw", 0.5));
        assert_eq!(k.rule.score(&c("rest and sleep", 3)), 0.5);
        let l = spec("type = \"length\"\nmin = 2\nmax = 4").compile("x", 32).unwrap();
        assert_eq!([1, 2, 4, 5].map(|n| l.rule.score(&c("", n))), [0.0, 1.0, 1.0, 0.0]);
        let o = spec("type = \"overlong\"\nbuffer = 8").compile("x", 32).unwrap();
        assert_eq!(o.rule.score(&c("", 28)), -0.5);
        let a = spec("type = \"accuracy\"").compile("x", 32).unwrap();
        assert!(a.rule.needs_reference());
        assert_eq!(a.rule.score(&c("it is 7", 3)), 1.0);
        for (text, want) in [
            ("type = \"format\"\nkeywords = [\"a\"]", "[grpo] rewards[1].keywords: a format reward does not read it"),
            ("type = \"length\"", "needs min, max or both"),
            ("type = \"overlong\"\nbuffer = 40", "rewards[1].buffer"),
            ("type = \"format\"\npattern = \"(\"", "rewards[1].pattern: not a valid regex"),
        ] {
            let e = spec(text).compile("[grpo] rewards[1]", 32).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = toml::from_str::<RewardSpec>("type = \"format\"\npatern = \"x\"").unwrap_err().to_string();
        assert!(e.contains("patern"), "{e}");
    }

    #[test]
    fn command_output_errors_name_the_line() {
        assert_eq!(parse_command_output("c", "1\n-0.5\n", 2).unwrap(), vec![1.0, -0.5]);
        let e = parse_command_output("c", "1\nabc\n", 2).unwrap_err().to_string();
        assert!(e.contains("output line 2") && e.contains("abc"), "{e}");
        let e = parse_command_output("c", "1\n", 2).unwrap_err().to_string();
        assert!(e.contains("printed 1 line(s) for 2"), "{e}");
        let e = parse_command_output("c", "nan\n", 1).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn command_runs_with_a_timeout() {
        let cmd = RewardCommand {
            command: "while read -r l; do echo \"${#l}\"; done".into(),
            timeout: Duration::from_secs(20),
        };
        let inputs = [
            CommandInput { prompt: "p", completion: "ab", reference: None },
            CommandInput { prompt: "p", completion: "abcd", reference: Some("x") },
        ];
        let got = cmd.score(&inputs).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got[1] > got[0], "{got:?}");
        let slow = RewardCommand { command: "sleep 5".into(), timeout: Duration::from_millis(200) };
        let e = slow.score(&inputs).unwrap_err().to_string();
        assert!(e.contains("reward_command_timeout"), "{e}");
        let failing = RewardCommand { command: "echo broken >&2; exit 3".into(), timeout: Duration::from_secs(5) };
        let e = failing.score(&inputs).unwrap_err().to_string();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
    }
}
