//! `align generate`: one prompt or a JSONL file of prompts, optionally through the chat template.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde_json::{json, Value};

use align_core::eval::answers::stop_token_ids;
use align_core::infer::generate::{generate_with_stats, SamplingConfig};
use align_core::text::chat::ChatMessage;

use crate::common::load_session_quantized;
use crate::{ModelArgs, QuantArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// One prompt.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A .jsonl file with one {"prompt": …} object per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Render each prompt as a user turn with the model's chat template (+ generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Prompts generated together (left-padded) when reading --prompts.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// One JSON object per prompt on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Reads `{"prompt": "…"}` lines; errors name the file and line.
pub fn read_prompt_file(path: &PathBuf) -> Result<Vec<String>> {
    let text = align_core::hf::folder::read_text_file(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
        match v.get("prompt") {
            Some(Value::String(s)) => out.push(s.clone()),
            Some(other) => bail!("{}:{}: field 'prompt': expected a string, found {other}", path.display(), i + 1),
            None => bail!("{}:{}: field 'prompt': missing", path.display(), i + 1),
        }
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0) {
        bail!("--temperature: expected a number ≥ 0, found {}", args.temperature);
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p: expected a number in (0, 1], found {p}");
        }
    }
    let prompts = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(file)) => read_prompt_file(file)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    let s = load_session_quantized(&args.model, &args.quant)?;
    let tok = &s.tokenizer;
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
    };
    let eos = stop_token_ids(tok, &s.model.lm.config.eos_token_ids);
    tch::manual_seed(args.seed);

    let mut encoded = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let text = if args.chat {
            let mut messages = Vec::new();
            if let Some(sys) = &args.system {
                messages.push(ChatMessage::new("system", sys));
            }
            messages.push(ChatMessage::new("user", p));
            tok.apply_chat_template(&messages, true)?
        } else {
            p.clone()
        };
        // a rendered chat template already holds its special tokens
        let ids = tok.encode(&text, !args.chat)?;
        if ids.is_empty() {
            bail!("prompt {:?} encodes to no tokens", p);
        }
        encoded.push(ids);
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (chunk_idx, chunk) in encoded.chunks(args.batch_size.max(1)).enumerate() {
        let (gens, stats) = generate_with_stats(&s.model.lm, chunk, &cfg, &eos, tok.padding_id())?;
        let seconds = stats.prefill_seconds + stats.decode_seconds;
        for (j, g) in gens.iter().enumerate() {
            let prompt = &prompts[chunk_idx * args.batch_size.max(1) + j];
            let text = tok.decode(&g.tokens, true)?;
            if args.json {
                let tps = if seconds > 0.0 { g.tokens.len() as f64 / seconds } else { 0.0 };
                writeln!(
                    out,
                    "{}",
                    json!({"prompt": prompt, "text": text, "tokens": g.tokens.len(), "tokens_per_second": tps})
                )?;
            } else {
                if prompts.len() > 1 {
                    writeln!(out, "### {prompt}")?;
                }
                writeln!(out, "{text}")?;
            }
        }
        tracing::info!(
            "batch of {}: prefill {:.0} tok/s, decode {:.1} tok/s ({} new tokens in {:.2}s)",
            chunk.len(),
            stats.prompt_tokens as f64 / stats.prefill_seconds.max(1e-9),
            stats.new_tokens as f64 / stats.decode_seconds.max(1e-9),
            stats.new_tokens,
            seconds
        );
    }
    Ok(())
}
