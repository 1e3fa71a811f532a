//! `align eval …`: model evaluations that print a table, or one JSON object with `--json`.
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use align_core::data::read_text_records;
use align_core::logprobs::corpus_perplexity;

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
