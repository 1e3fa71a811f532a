//! `align eval …`: model evaluations that print a table, or one JSON object with `--json`.
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use align_core::checkpoint::resolve_model_dir;
use align_core::data::{read_preference, read_text_records, DataOptions, LengthBudget, LengthPolicy};
use align_core::device::{parse_device, parse_dtype};
use align_core::logprobs::{perplexity as ppl_of, sequences_nll};
use align_core::preference_batch::encode_pairs;
use align_core::scalar_model::load_reward_model;
use align_core::ModelTokenizer;

use crate::common::load_session;
use crate::ModelArgs;

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    let s = load_session(&args.model)?;
    let mut seqs = Vec::with_capacity(records.len());
    let mut truncated = 0;
    for r in &records {
        let mut ids = s.tokenizer.encode(&r.text, true)?;
        if ids.len() > args.max_length {
            ids.truncate(args.max_length);
            truncated += 1;
        }
        seqs.push(ids);
    }
    let started = std::time::Instant::now();
    let per = sequences_nll(&s.model.lm, &seqs, args.batch_tokens)?;
    let nll: f64 = per.iter().map(|p| p.nll).sum();
    let tokens: i64 = per.iter().map(|p| p.tokens).sum();
    let ppl = ppl_of(&per);
    tracing::info!(
        "scored {tokens} tokens in {:.2}s ({truncated} records truncated to {})",
        started.elapsed().as_secs_f64(),
        args.max_length
    );
    if args.json {
        println!("{}", json!({"perplexity": ppl, "nll": nll, "tokens": tokens, "records": records.len()}));
    } else {
        println!("{:<12} {:>12} {:>14} {:>10}", "records", "tokens", "mean nll", "perplexity");
        println!("{:<12} {:>12} {:>14.6} {:>10.4}", records.len(), tokens, nll / tokens.max(1) as f64, ppl);
    }
    Ok(())
}

#[derive(Args)]
pub struct RewardEvalArgs {
    /// --model: a reward-model folder (`*ForSequenceClassification`, as `align train reward` writes it).
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
    if let Some(n) = args.model.threads {
        tch::set_num_threads(n);
    }
    let device = parse_device(&args.model.device)?;
    let kind = parse_dtype(args.model.dtype.as_deref(), device)?;
    let dir = resolve_model_dir(&args.model.model)?;
    let rm = load_reward_model(&dir, device, kind)?;
    let tokenizer = ModelTokenizer::from_dir(&dir)?;
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
    }
    Ok(())
}
