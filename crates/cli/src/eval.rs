//! `align eval …`: model evaluations that print a table, or one JSON object with `--json`.
use std::path::PathBuf;

use anyhow::{bail, Result};
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
