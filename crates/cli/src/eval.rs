//! `align eval …`: model evaluations that print a table, or one JSON object with `--json`.
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::json;

use align_core::data::{read_preference, read_sft, read_text_records, DataOptions, LengthBudget, LengthPolicy};
use align_core::eval::answers::{answer_case, evaluate_answers};
use align_core::infer::logprobs::corpus_perplexity;
use align_core::load::spec::AdapterMode;
use align_core::train::preference_batch::encode_pairs;

use crate::common::{load_session, load_session_quantized};
use crate::{ModelArgs, QuantArgs};

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// .txt (every non-empty line is a record) or .jsonl / .json (`text` field).
    #[arg(long)]
    pub data: PathBuf,
    /// Records are truncated to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Tokens per forward batch.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn perplexity(args: PerplexityArgs) -> Result<()> {
    crate::existing(&args.data, "data file")?;
    if args.max_length < 2 {
        bail!("--max-length: expected at least 2 tokens, found {}", args.max_length);
    }
    let records = read_text_records(&args.data)?;
    if records.is_empty() {
        bail!("{}: no records", args.data.display());
    }
    let s = load_session_quantized(&args.model, &args.quant)?;
    let texts: Vec<String> = records.into_iter().map(|r| r.text).collect();
    let started = std::time::Instant::now();
    let r = corpus_perplexity(&s.model.lm, &s.tokenizer, &texts, args.max_length, args.batch_tokens)?;
    let (ppl, nll, tokens) = (r.perplexity, r.nll, r.tokens);
    tracing::info!(
        "scored {tokens} tokens in {:.2}s ({} records truncated to {})",
        started.elapsed().as_secs_f64(),
        r.truncated,
        args.max_length
    );
    if args.json {
        println!("{}", json!({"perplexity": ppl, "nll": nll, "tokens": tokens, "records": r.records}));
    } else {
        println!("{:<12} {:>12} {:>14} {:>10}", "records", "tokens", "mean nll", "perplexity");
        println!("{:<12} {:>12} {:>14.6} {:>10.4}", r.records, tokens, nll / tokens.max(1) as f64, ppl);
    }
    Ok(())
}

#[derive(Args)]
pub struct AnswersArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SFT conversations (.jsonl / .json: ShareGPT, OpenAI messages, Alpaca, prompt/completion).
    #[arg(long)]
    pub data: PathBuf,
    /// Answer length limit in tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts generated together (left-padded).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Use only the first N conversations.
    #[arg(long)]
    pub limit: Option<usize>,
    /// One JSON object: {"bleu4","rouge_l","char_f1","exact_match","f1","samples","examples":[first 5]}.
    #[arg(long)]
    pub json: bool,
}

pub fn answers(args: AnswersArgs) -> Result<()> {
    crate::existing(&args.data, "data file")?;
    if args.batch_size == 0 {
        bail!("--batch-size: expected at least 1, found 0");
    }
    if args.limit == Some(0) {
        bail!("--limit: expected at least 1, found 0");
    }
    let mut conversations = read_sft(&[&args.data], &DataOptions::default())?.records;
    if let Some(n) = args.limit {
        conversations.truncate(n);
    }
    let cases = conversations.iter().map(answer_case).collect::<Result<Vec<_>>>()?;
    let s = load_session(&args.model)?;
    let result = evaluate_answers(&s.model.lm, &s.tokenizer, &cases, args.max_new_tokens, args.batch_size)?;
    if result.truncated_prompts > 0 {
        tracing::warn!(
            "{} prompts were cut from the left to fit the model's {} positions with {} new tokens",
            result.truncated_prompts,
            s.model.lm.config.max_position_embeddings,
            args.max_new_tokens
        );
    }
    tracing::info!(
        "generated {} tokens for {} prompts in {:.2}s",
        result.generated_tokens,
        cases.len(),
        result.seconds
    );
    let sc = result.scores;
    if args.json {
        let examples: Vec<_> = result
            .answered
            .iter()
            .take(5)
            .map(|a| json!({"prompt": a.prompt, "reference": a.reference, "answer": a.answer}))
            .collect();
        println!(
            "{}",
            json!({"bleu4": sc.bleu4, "rouge_l": sc.rouge_l, "char_f1": sc.char_f1, "exact_match": sc.exact_match, "f1": sc.f1, "samples": sc.samples, "examples": examples})
        );
    } else {
        println!("{:<12} {:>8} {:>6}", "metric", "value", "n");
        let rows = [
            ("bleu4", sc.bleu4),
            ("rouge_l", sc.rouge_l),
            ("char_f1", sc.char_f1),
            ("exact_match", sc.exact_match),
            ("f1", sc.f1),
        ];
        for (name, value) in rows {
            println!("{name:<12} {value:>8.4} {:>6}", sc.samples);
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct RewardEvalArgs {
    /// --model: a reward-model folder (`*ForSequenceClassification`, as `align train reward` writes
    /// it), or a LoRA reward-model adapter folder (its base model is adapter_config.json's
    /// base_model_name_or_path); --adapter: a reward-model adapter applied on top of --model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Preference files (any format `align data check --kind preference` reads; repeatable).
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Conversations are truncated to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Pairs per forward batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn reward(args: RewardEvalArgs) -> Result<()> {
    for d in &args.data {
        crate::existing(d, "data file")?;
    }
    if args.max_length < 2 {
        bail!("--max-length: expected at least 2 tokens, found {}", args.max_length);
    }
    let (rm, tokenizer) = args.model.spec()?.scalar_model()?;
    let pairs = read_preference(&args.data, &DataOptions::default())?.records;
    let budget = LengthBudget::new(args.max_length, LengthPolicy::Truncate);
    let (encoded, counts) = encode_pairs(&tokenizer, &pairs.iter().collect::<Vec<_>>(), budget)?;
    if encoded.is_empty() {
        bail!("no pair is left after truncation to --max-length {}", args.max_length);
    }
    let stats = align_reward::pairwise_stats(&rm.rm, &encoded, args.batch_size)?;
    tracing::info!(
        "scored {} pairs ({} truncated, {} dropped at max_length {})",
        stats.pairs,
        counts.truncated,
        counts.dropped,
        args.max_length
    );
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        println!(
            "{:<8} {:>10} {:>12} {:>14} {:>16}",
            "pairs", "accuracy", "mean margin", "mean chosen", "mean rejected"
        );
        println!(
            "{:<8} {:>10.4} {:>12.4} {:>14.4} {:>16.4}",
            stats.pairs, stats.accuracy, stats.mean_margin, stats.mean_chosen_reward, stats.mean_rejected_reward
        );
        let matched = stats.length_matched_accuracy.map_or("-".to_string(), |a| format!("{a:.4}"));
        println!(
            "length-matched pairs (answer tokens within {:.0}%): {} of {}, accuracy {matched}; chosen is the longer answer in {:.1}% of pairs",
            align_reward::LENGTH_MATCH_TOLERANCE * 100.0,
            stats.length_matched_pairs,
            stats.pairs,
            stats.longer_chosen_share * 100.0
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct WinrateArgs {
    /// The model being judged (`--model`, with `--adapter`), and the device, dtype and threads
    /// every model of the comparison runs with.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The model it is compared with.
    #[arg(long)]
    pub baseline: String,
    /// A LoRA adapter folder applied on top of --baseline.
    #[arg(long)]
    pub baseline_adapter: Option<String>,
    /// Reward model folder (align train reward output: a full model, or a LoRA adapter folder on
    /// its base_model_name_or_path) that scores prompt + answer.
    #[arg(long)]
    pub reward_model: String,
    /// Prompts (.jsonl / .json: {"prompt"}, {"question","answer"}, conversations, Alpaca).
    #[arg(long)]
    pub prompts: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Use only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Token budget of prompt + answer for the reward model.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// One JSON object: {"win_rate","ci_low","ci_high","wins","ties","losses","prompts","mean_score_model","mean_score_baseline"}.
    #[arg(long)]
    pub json: bool,
}

pub fn winrate(args: WinrateArgs) -> Result<()> {
    use align_core::eval::winrate::{answer_prompts, score_answers, win_rate};
    crate::existing(&args.prompts, "prompt file")?;
    let mut prompts: Vec<Vec<align_core::text::chat::ChatMessage>> =
        align_core::data::read_prompts(&[&args.prompts], &DataOptions::default())?
            .records
            .into_iter()
            .map(|r| r.messages)
            .collect();
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", args.prompts.display());
    }
    // one model in memory at a time: answer with A, then B, then score both with the RM
    let mut answers = Vec::new();
    for spec in [args.model.spec()?, args.model.spec_of(&args.baseline, args.baseline_adapter.as_deref())?] {
        let m = spec.causal_lm(AdapterMode::Merge)?;
        let (lm, tok) = (&m.model.lm, &m.tokenizer);
        answers.push(tch::no_grad(|| answer_prompts(lm, tok, &prompts, args.max_new_tokens, args.batch_size))?);
    }
    let (rm, rm_tok) = args.model.spec_of(&args.reward_model, None)?.scalar_model()?;
    let a = score_answers(&rm.rm, &rm_tok, &prompts, &answers[0], args.max_length, args.batch_size)?;
    let b = score_answers(&rm.rm, &rm_tok, &prompts, &answers[1], args.max_length, args.batch_size)?;
    let w = win_rate(&a, &b)?;
    if args.json {
        println!("{}", serde_json::to_string(&w)?);
    } else {
        println!("{:<22} {:>10}", "metric", "value");
        println!("{:<22} {:>10.4}", "win rate", w.win_rate);
        println!("{:<22} {:>4.3}–{:.3}", "95% CI (Wilson)", w.ci_low, w.ci_high);
        println!("{:<22} {:>10}", "wins / ties / losses", format!("{}/{}/{}", w.wins, w.ties, w.losses));
        println!("{:<22} {:>10.4}", "mean RM score model", w.mean_score_model);
        println!("{:<22} {:>10.4}", "mean RM score baseline", w.mean_score_baseline);
    }
    Ok(())
}

#[derive(Args)]
pub struct JudgeArgs {
    /// The model being judged (`--model`, with `--adapter`), and the device, dtype and threads
    /// every local model of the run uses.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The model it is compared with (needed by --mode pairwise; in score mode its answers are
    /// rated too and the win rate compares the ratings).
    #[arg(long)]
    pub baseline: Option<String>,
    /// A LoRA adapter folder applied on top of --baseline.
    #[arg(long, requires = "baseline")]
    pub baseline_adapter: Option<String>,
    /// The judge: a local model folder (greedy, with its chat template) or an OpenAI-compatible
    /// server, `http://host:port` or `http://host:port/v1` (POST /v1/chat/completions,
    /// temperature 0; plain HTTP only).
    #[arg(long)]
    pub judge: String,
    /// Prompts (.jsonl / .json: {"prompt"}, {"question","answer"}, conversations, Alpaca).
    #[arg(long)]
    pub prompts: PathBuf,
    /// score: a 1–10 rating of each answer (MT-Bench single-answer grading); pairwise: which of
    /// the two answers is better, judged in both orders (MT-Bench pairwise comparison).
    #[arg(long, default_value = "score", value_name = "score|pairwise")]
    pub mode: String,
    /// The model name sent to an endpoint judge (default: the first of GET /v1/models).
    #[arg(long)]
    pub judge_model: Option<String>,
    /// The environment variable holding the endpoint's API key (sent as a Bearer token).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// A custom judge prompt: the whole user message, with {question} and {answer} (score) or
    /// {answer_a} and {answer_b} (pairwise); `{{` / `}}` for literal braces.
    #[arg(long)]
    pub rubric: Option<PathBuf>,
    /// Answer length limit of the judged models, in tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Judgement length limit, in tokens.
    #[arg(long, default_value_t = 512)]
    pub judge_max_new_tokens: usize,
    /// Prompts generated together by a local model (left-padded).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Use only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seconds an endpoint judge may take per request.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Writes one JSON line per prompt: question, answers, each judgement's raw text and what
    /// was read from it, the outcome.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// One JSON object: {"mode","judge","judge_model","prompts","judgements","unparseable",
    /// "model","baseline","win"} (model/baseline: {"mean","stderr","n","unparseable"}; win:
    /// {"win_rate","ci_low","ci_high","wins","ties","losses","unparseable"}).
    #[arg(long)]
    pub json: bool,
}

pub fn judge(args: JudgeArgs) -> Result<()> {
    use align_core::eval::chat_endpoint::ChatEndpoint;
    use align_core::eval::judge::{judge_answers, question_text, JudgeMode, Rubric};
    use align_core::eval::winrate::answer_prompts;
    use align_core::text::chat::ChatMessage;
    crate::existing(&args.prompts, "prompt file")?;
    let mode = JudgeMode::parse(&args.mode)?;
    if mode == JudgeMode::Pairwise && args.baseline.is_none() {
        bail!("--mode pairwise: needs --baseline (the model the answers are compared with)");
    }
    if args.batch_size == 0 {
        bail!("--batch-size: expected at least 1, found 0");
    }
    if args.limit == Some(0) {
        bail!("--limit: expected at least 1, found 0");
    }
    let rubric = match &args.rubric {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            Rubric::parse(mode, &text, &path.display().to_string())?
        }
        None => Rubric::builtin(mode),
    };
    let is_url = args.judge.starts_with("http://") || args.judge.starts_with("https://");
    let endpoint = if is_url {
        let key = match &args.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| anyhow!("--api-key-env: the variable {var} is not set"))?),
            None => None,
        };
        let e = ChatEndpoint::from_url(&args.judge, key, std::time::Duration::from_secs(args.timeout.max(1)))?;
        let name = match &args.judge_model {
            Some(n) => n.clone(),
            None => e.first_model()?,
        };
        Some((e, name))
    } else {
        if args.judge_model.is_some() || args.api_key_env.is_some() {
            bail!("--judge-model / --api-key-env: only for an endpoint judge (--judge http://…)");
        }
        None
    };
    let mut prompts: Vec<Vec<ChatMessage>> = align_core::data::read_prompts(&[&args.prompts], &DataOptions::default())?
        .records
        .into_iter()
        .map(|r| r.messages)
        .collect();
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", args.prompts.display());
    }
    // one model in memory at a time: answer with A, then B, then judge
    let mut specs = vec![args.model.spec()?];
    if let Some(b) = &args.baseline {
        specs.push(args.model.spec_of(b, args.baseline_adapter.as_deref())?);
    }
    let mut answers = Vec::new();
    for spec in specs {
        let m = spec.causal_lm(AdapterMode::Merge)?;
        let (lm, tok) = (&m.model.lm, &m.tokenizer);
        let got = tch::no_grad(|| answer_prompts(lm, tok, &prompts, args.max_new_tokens, args.batch_size))?;
        answers.push(got.into_iter().map(|a| a.trim().to_string()).collect::<Vec<_>>());
    }
    let questions: Vec<String> = prompts.iter().map(|p| question_text(p)).collect();
    let local = match &endpoint {
        Some(_) => None,
        None => Some(args.model.spec_of(&args.judge, None)?.causal_lm(AdapterMode::Merge)?),
    };
    let mut ask = |convs: &[Vec<ChatMessage>]| -> Result<Vec<String>> {
        let replies = match (&endpoint, &local) {
            (Some((e, name)), _) => {
                let mut out = Vec::with_capacity(convs.len());
                for (i, c) in convs.iter().enumerate() {
                    out.push(e.complete(name, c, args.judge_max_new_tokens)?);
                    tracing::info!("judged {}/{}", i + 1, convs.len());
                }
                out
            }
            (None, Some(m)) => tch::no_grad(|| {
                answer_prompts(&m.model.lm, &m.tokenizer, convs, args.judge_max_new_tokens, args.batch_size)
            })?,
            (None, None) => bail!("no judge"),
        };
        Ok(replies)
    };
    let (summary, records) =
        judge_answers(&mut ask, &rubric, &questions, &answers[0], answers.get(1).map(Vec::as_slice))?;
    if summary.unparseable > 0 {
        tracing::warn!(
            "{} of {} judgements could not be read (see --output for the raw text)",
            summary.unparseable,
            summary.judgements
        );
    }
    if let Some(path) = &args.output {
        let lines = records.iter().map(serde_json::to_string).collect::<serde_json::Result<Vec<_>>>()?;
        align_core::data::prep::write_lines(path, lines.iter().map(String::as_str))?;
    }
    let judge_model = endpoint.as_ref().map(|(_, n)| n.clone());
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["judge"] = json!(args.judge);
        v["judge_model"] = json!(judge_model);
        println!("{v}");
        return Ok(());
    }
    let num = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.4}"));
    println!("{:<24} {:>12}", "metric", "value");
    println!("{:<24} {:>12}", "mode", mode.as_str());
    println!("{:<24} {:>12}", "prompts", summary.prompts);
    println!("{:<24} {:>12}", "judgements", summary.judgements);
    println!("{:<24} {:>12}", "unparseable", summary.unparseable);
    for (name, m) in [("mean rating model", &summary.model), ("mean rating baseline", &summary.baseline)] {
        if let Some(m) = m {
            println!("{name:<24} {:>12} ± {} (n {})", num(m.mean), num(m.stderr), m.n);
        }
    }
    if let Some(w) = &summary.win {
        println!("{:<24} {:>12}", "win rate", num(w.win_rate));
        println!("{:<24} {:>12}", "95% CI (Wilson)", format!("{}–{}", num(w.ci_low), num(w.ci_high)));
        println!("{:<24} {:>12}", "wins / ties / losses", format!("{}/{}/{}", w.wins, w.ties, w.losses));
    }
    Ok(())
}
