//! `align bench generate`: prefill and decode throughput of the generation engine at several batch
//! sizes, printed next to transformers' `generate` on the same prompts and settings (run through
//! `benches/hf_generate.py`) with the ratio.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use align_core::infer::generate::{generate_with_stats, SamplingConfig};

use crate::common::load_session;
use crate::ModelArgs;

#[derive(Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated batch sizes.
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed runs per batch size (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Python with transformers for the reference run ("none" to skip). Default: .venv/bin/python.
    #[arg(long)]
    pub reference_python: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// The synthetic prompt ids shared with `benches/hf_generate.py` (same formula on both sides).
pub fn bench_prompt(row: usize, len: usize, seed: u64, vocab: i64) -> Vec<i64> {
    (0..len).map(|j| 3 + ((row as i64 * 7919 + j as i64 * 104729 + seed as i64 * 31) % (vocab - 3))).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn reference(args: &BenchGenerateArgs, dir: &str, dtype: &str, device: &str) -> Result<Option<Value>> {
    let python = match args.reference_python.as_deref() {
        Some("none") => return Ok(None),
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(".venv/bin/python"),
    };
    let script = PathBuf::from("benches/hf_generate.py");
    if !python.exists() || !script.exists() {
        tracing::warn!(
            "no reference run: {} or {} not found (run from the repository root)",
            python.display(),
            script.display()
        );
        return Ok(None);
    }
    let sizes: Vec<String> = args.batch_sizes.iter().map(usize::to_string).collect();
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(["--model", dir, "--batch-sizes", &sizes.join(","), "--dtype", dtype, "--device", device])
        .args(["--prompt-len", &args.prompt_len.to_string(), "--new-tokens", &args.new_tokens.to_string()])
        .args(["--repeats", &args.repeats.to_string(), "--seed", &args.seed.to_string()]);
    // same intra-op thread count on both sides
    cmd.args(["--threads", &tch::get_num_threads().to_string()]);
    tracing::info!("running the transformers reference: {:?}", cmd);
    let out = cmd.output().with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("reference run failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| anyhow!("reference run printed no JSON: {e}"))?;
    Ok(Some(v))
}

pub fn generate(args: BenchGenerateArgs) -> Result<()> {
    if args.batch_sizes.is_empty() || args.repeats == 0 || args.prompt_len == 0 || args.new_tokens == 0 {
        bail!("--batch-sizes, --repeats, --prompt-len and --new-tokens must be positive");
    }
    let s = load_session(&args.model)?;
    let lm = &s.model.lm;
    let vocab = lm.config.vocab_size;
    let cfg = SamplingConfig { max_new_tokens: args.new_tokens, ..Default::default() };
    let dtype = match lm.kind() {
        tch::Kind::BFloat16 => "bf16",
        tch::Kind::Half => "f16",
        _ => "f32",
    };
    let device = if s.device.is_cuda() { "cuda" } else { "cpu" };
    let mut rows = Vec::new();
    for &b in &args.batch_sizes {
        let prompts: Vec<Vec<i64>> = (0..b).map(|r| bench_prompt(r, args.prompt_len, args.seed, vocab)).collect();
        generate_with_stats(lm, &prompts, &cfg, &[], 0)?; // warm-up
        let (mut prefill, mut decode, mut total) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeats {
            let (gens, st) = generate_with_stats(lm, &prompts, &cfg, &[], 0)?;
            let produced: usize = gens.iter().map(|g| g.tokens.len()).sum();
            prefill.push(st.prompt_tokens as f64 / st.prefill_seconds);
            // the first token comes from the prefill logits; decode steps produce the rest
            decode.push(produced as f64 / st.decode_seconds);
            total.push(st.prefill_seconds + st.decode_seconds);
        }
        rows.push(json!({"batch": b, "prefill_tokens_per_second": median(prefill), "decode_tokens_per_second": median(decode), "generate_seconds": median(total)}));
    }
    let dir = s.model.dir.display().to_string();
    let ours = json!({"engine": "align", "device": device, "dtype": dtype, "threads": tch::get_num_threads(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "results": rows});
    drop(s);
    let theirs = reference(&args, &dir, dtype, device)?;
    if args.json {
        println!("{}", json!({"model": dir, "align": ours, "transformers": theirs}));
        return Ok(());
    }
    println!(
        "generation benchmark: {dir}  ({device}, {dtype}, {} threads, prompt {} tokens, {} new tokens, greedy)",
        ours["threads"], args.prompt_len, args.new_tokens
    );
    println!(
        "{:>6} | {:>14} {:>14} {:>7} | {:>14} {:>14} {:>7}",
        "batch", "prefill align", "transformers", "ratio", "decode align", "transformers", "ratio"
    );
    for (i, r) in ours["results"].as_array().into_iter().flatten().enumerate() {
        let t = theirs.as_ref().and_then(|t| t["results"].get(i));
        let cell = |key: &str| -> (String, String) {
            let a = r[key].as_f64().unwrap_or(0.0);
            match t.and_then(|t| t[key].as_f64()) {
                Some(b) if b > 0.0 => (format!("{b:>14.1}"), format!("{:>6.2}x", a / b)),
                _ => (format!("{:>14}", "-"), format!("{:>7}", "-")),
            }
        };
        let (pt, pr) = cell("prefill_tokens_per_second");
        let (dt, dr) = cell("decode_tokens_per_second");
        println!(
            "{:>6} | {:>14.1} {pt} {pr} | {:>14.1} {dt} {dr}",
            r["batch"],
            r["prefill_tokens_per_second"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_second"].as_f64().unwrap_or(0.0)
        );
    }
    println!("tokens/s; ratio = align / transformers (higher is better for align)");
    Ok(())
}
