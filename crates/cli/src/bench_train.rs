//! `align bench train`: throughput, the split of a step (forward / backward / optimizer /
//! generation), peak memory and MFU of a stage's real training loop (`train_stage`, the code
//! `align train` runs) on synthetic data of a chosen length, on CPU or CUDA.
//!
//! MFU = model FLOP/s ÷ the device's peak dense FLOP/s. Model FLOPs per trained token:
//! 2·N forward + 2·N for the activations' gradients + 2·N_trainable for the weights' gradients
//! (6·N in full fine-tuning), plus attention 12·L·(heads·head_dim)·T (PaLM's count at context
//! T = the sequence length); per generated token 2·N. N counts the projections and the LM head
//! (not the embedding lookup). A DPO reference's, PPO's reward and value models' and GRPO's
//! reference passes are not counted: the figure is a lower bound for those stages. The peak is
//! `--peak-tflops`, else the GPU's dense bf16 peak from a table of known GPUs, else (CPU) a
//! matmul measured here in the run's dtype.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use align_core::hf::checkpoint::resolve_model_dir;
use align_core::hf::config::ModelConfig;
use align_core::text::tokenizer::ModelTokenizer;
use align_core::train::config::LoadedConfig;
use align_core::train::phases;
use align_core::train::plan::parameter_shapes;
use align_pipeline::{train_stage, StageKind};
use align_runs::metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchStage {
    Sft,
    Dpo,
    Ppo,
    Grpo,
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Model folder (HF layout) or hub id in the local cache.
    #[arg(long, conflicts_with = "init", required_unless_present = "init")]
    pub model: Option<String>,
    /// A model description (as `align init` takes) to initialise randomly instead of --model.
    #[arg(long, requires = "tokenizer")]
    pub init: Option<PathBuf>,
    /// Tokenizer folder for --init.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub stage: BenchStage,
    /// full or lora (`[lora]` defaults: r 8, all-linear).
    #[arg(long, default_value = "full")]
    pub method: String,
    /// Tokens of text per sequence (SFT: the answer; DPO: each response; PPO, GRPO: the prompt);
    /// a chat template adds its own tokens, and the figures count the tokens the steps saw.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Sequences per step (`train.batch_size`; PPO: the rollout batch; GRPO: completions per
    /// iteration, 2 per prompt).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Measured steps (after the warm-up steps).
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
    /// Steps run first and left out of the figures (allocator and kernel warm-up).
    #[arg(long, default_value_t = 1)]
    pub warmup_steps: u64,
    /// Tokens generated per completion (PPO, GRPO).
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Intra-op CPU threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// The device's peak dense FLOP/s in TFLOP/s (default: known GPUs' bf16 peak, or a matmul
    /// measured on CPU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Work folder (model, data, run; default: a temporary folder, removed afterwards).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Dense bf16 peak TFLOP/s (no sparsity) of GPUs by a name fragment, most specific first.
const KNOWN_GPUS: &[(&str, f64)] = &[
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
];

/// The known peak of a GPU named `name` (nvidia-smi's name), if any.
pub fn known_gpu_peak(name: &str) -> Option<f64> {
    let upper = name.to_uppercase();
    KNOWN_GPUS.iter().find(|(k, _)| upper.contains(k)).map(|(_, v)| *v)
}

/// Parameters the matmuls of one token's forward pass touch (projections and LM head), all of
/// them and the trainable ones.
fn matmul_parameters(c: &ModelConfig, lora: bool) -> (f64, f64) {
    let mut n = 0.0;
    for (name, shape) in parameter_shapes(c) {
        if shape.len() == 2 && name != "model.embed_tokens.weight" {
            n += (shape[0] * shape[1]) as f64;
        }
    }
    if c.tie_word_embeddings {
        n += (c.vocab_size * c.hidden_size) as f64;
    }
    let trainable = if lora {
        // r 8 on every projection of every layer (the `[lora]` defaults the bench trains)
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let r = 8;
        let per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h));
        (per_layer * c.num_hidden_layers) as f64
    } else {
        n
    };
    (n, trainable)
}

/// Training FLOPs per token and generation FLOPs per token (see the module's doc).
fn flops_per_token(c: &ModelConfig, lora: bool, context: usize) -> (f64, f64) {
    let (n, trainable) = matmul_parameters(c, lora);
    let attention = 12.0 * (c.num_hidden_layers * c.num_attention_heads * c.head_dim) as f64 * context as f64;
    (4.0 * n + 2.0 * trainable + attention, 2.0 * n)
}

/// Best of a few timed `[n, n] @ [n, n]` products in `kind`: the device's achievable dense
/// FLOP/s, in TFLOP/s.
fn measured_matmul_tflops(device: Device, kind: Kind) -> Result<f64> {
    let n = if device.is_cuda() { 8192 } else { 1024 };
    let a = Tensor::f_randn([n, n], (kind, device))?;
    let b = Tensor::f_randn([n, n], (kind, device))?;
    let _ = a.f_matmul(&b)?; // warm-up
    phases::synchronize();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        let _ = a.f_matmul(&b)?;
        phases::synchronize();
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e12)
}

/// nvidia-smi's name of the first GPU, when there is one.
fn gpu_name() -> Option<String> {
    let out =
        std::process::Command::new("nvidia-smi").args(["--query-gpu=name", "--format=csv,noheader"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string()).filter(|l| !l.is_empty())
}

/// Device memory this process holds on the GPU (the caching allocator's reservation, as
/// nvidia-smi reports it), in bytes.
fn gpu_memory_of_this_process() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut parts = l.split(',').map(str::trim);
        (parts.next()? == me).then(|| parts.next()?.parse::<u64>().ok().map(|mib| mib << 20))?
    })
}

/// Deterministic filler text of about `tokens` tokens of `tok`.
fn filler(tok: &ModelTokenizer, tokens: usize, seed: u64) -> Result<String> {
    const WORDS: &[&str] = &[
        "patient",
        "fever",
        "cough",
        "dose",
        "blood",
        "pressure",
        "heart",
        "rate",
        "symptom",
        "treatment",
        "doctor",
        "clinic",
        "infection",
        "pain",
        "chronic",
        "acute",
        "daily",
        "tablet",
        "water",
        "sleep",
        "rest",
        "test",
        "result",
        "normal",
        "risk",
        "factor",
        "kidney",
        "liver",
        "lung",
        "skin",
        "allergy",
        "vaccine",
        "diet",
        "exercise",
        "weight",
        "sugar",
        "level",
        "follow",
        "up",
        "week",
    ];
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut word = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        WORDS[((state >> 33) % WORDS.len() as u64) as usize]
    };
    let sample: Vec<&str> = (0..200).map(|_| word()).collect();
    let per_word = tok.encode(&sample.join(" "), false)?.len() as f64 / 200.0;
    let mut n = ((tokens as f64 / per_word.max(0.1)).ceil() as usize).max(1);
    let words: Vec<&str> = (0..n).map(|_| word()).collect();
    // cut to at most `tokens` tokens (the estimate may be off for small vocabularies)
    loop {
        let text = words[..n].join(" ");
        let len = tok.encode(&text, false)?.len();
        if len <= tokens || n == 1 {
            return Ok(text);
        }
        n = (n * tokens / len).min(n - 1).max(1);
    }
}

/// Writes the stage's synthetic data (enough records for every step) into `dir`; returns the file.
fn write_data(args: &BenchTrainArgs, tok: &ModelTokenizer, dir: &Path) -> Result<PathBuf> {
    let records = (args.batch * (args.steps + args.warmup_steps) as usize * 2).max(8);
    let mut lines = Vec::with_capacity(records);
    for i in 0..records {
        let seed = i as u64;
        let line = match args.stage {
            // a short question, an answer filling the sequence (cut to train.max_length)
            BenchStage::Sft => json!({"conversations": [
                {"from": "human", "value": filler(tok, 16, seed)?},
                {"from": "gpt", "value": filler(tok, args.seq, seed + 1_000_000)?},
            ]}),
            BenchStage::Dpo => json!({
                "conversations": [{"from": "human", "value": filler(tok, 16, seed)?}],
                "chosen": filler(tok, args.seq, seed + 1_000_000)?,
                "rejected": filler(tok, args.seq, seed + 2_000_000)?,
            }),
            // a prompt of about seq tokens once the chat template is around it
            BenchStage::Ppo | BenchStage::Grpo => {
                json!({"question": filler(tok, args.seq.saturating_sub(16).max(4), seed)?})
            }
        };
        lines.push(line.to_string());
    }
    let file = dir.join("data.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n")?;
    Ok(file)
}

/// The stage's config table.
fn stage_table(
    args: &BenchTrainArgs,
    model: &Path,
    max_positions: i64,
    data: &Path,
    run: &Path,
    reward: Option<&Path>,
) -> Result<toml::Table> {
    let total = args.steps + args.warmup_steps;
    let mut t = toml::Table::new();
    t.insert("model".into(), model.display().to_string().into());
    t.insert("data".into(), toml::Value::Array(vec![data.display().to_string().into()]));
    t.insert("output_dir".into(), run.display().to_string().into());
    t.insert("method".into(), args.method.clone().into());
    let mut train = toml::Table::new();
    train.insert("max_steps".into(), (total as i64).into());
    train.insert("batch_size".into(), (args.batch as i64).into());
    train.insert("lr".into(), 1e-5.into());
    train.insert("device".into(), args.device.clone().into());
    if let Some(d) = &args.dtype {
        train.insert("dtype".into(), d.clone().into());
    }
    if let Some(n) = args.threads {
        train.insert("threads".into(), (n as i64).into());
    }
    if args.gradient_checkpointing {
        train.insert("gradient_checkpointing".into(), true.into());
    }
    // prompts up to seq + 128 tokens (a chat template's own tokens around the text) are kept:
    // the stage's max_prompt_length is what the completion leaves, within the model's positions
    let prompt_and_completion = (args.seq + 128 + args.new_tokens).min(max_positions.max(1) as usize);
    let max_length = match args.stage {
        BenchStage::Sft => args.seq + 128,
        BenchStage::Dpo => 2 * args.seq + 128,
        BenchStage::Ppo | BenchStage::Grpo => prompt_and_completion,
    }
    .min(max_positions.max(1) as usize);
    train.insert("max_length".into(), (max_length as i64).into());
    t.insert("train".into(), train.into());
    match args.stage {
        BenchStage::Sft | BenchStage::Dpo => {}
        BenchStage::Ppo => {
            let reward = reward.ok_or_else(|| anyhow!("PPO needs a reward model"))?;
            let mut p = toml::Table::new();
            p.insert("reward_model".into(), reward.display().to_string().into());
            p.insert("value_model".into(), "policy".into());
            p.insert("rollout_batch_size".into(), (args.batch as i64).into());
            p.insert("max_new_tokens".into(), (args.new_tokens as i64).into());
            p.insert("ppo_epochs".into(), 1.into());
            t.insert("ppo".into(), p.into());
        }
        BenchStage::Grpo => {
            if args.batch < 2 || args.batch % 2 != 0 {
                bail!("--batch {}: GRPO's bench samples 2 completions per prompt; give an even batch", args.batch);
            }
            let mut g = toml::Table::new();
            g.insert("num_generations".into(), 2.into());
            g.insert("generation_batch_size".into(), (args.batch as i64).into());
            g.insert("max_completion_length".into(), (args.new_tokens as i64).into());
            let mut rule = toml::Table::new();
            rule.insert("type".into(), "length".into());
            rule.insert("min".into(), ((args.new_tokens / 2).max(1) as i64).into());
            g.insert("rewards".into(), toml::Value::Array(vec![rule.into()]));
            t.insert("grpo".into(), g.into());
        }
    }
    Ok(t)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A reward model for the PPO bench: the policy's trunk with a seeded head.
fn write_reward_model(model: &Path, tok: &ModelTokenizer, dir: &Path) -> Result<()> {
    use align_core::model::scalar::{scalar_model_from_causal_lm, write_scalar_model, ScoreInit};
    let config = ModelConfig::from_dir(model)?;
    let rm = scalar_model_from_causal_lm(
        model,
        Device::Cpu,
        Kind::Float,
        tok.padding_id(),
        ScoreInit::default_for(config.hidden_size, 0),
    )?;
    std::fs::create_dir_all(dir)?;
    write_scalar_model(&rm.vs, &rm.rm, dir, None, Some(model))
}

pub fn train(args: BenchTrainArgs) -> Result<()> {
    if !matches!(args.method.as_str(), "full" | "lora") {
        bail!("--method {}: the bench trains \"full\" or \"lora\"", args.method);
    }
    if args.steps == 0 {
        bail!("--steps 0: nothing to measure");
    }
    let tmp;
    let work = match &args.out {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create", d.display()))?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let model = match (&args.model, &args.init) {
        (Some(m), _) => resolve_model_dir(m)?,
        (None, Some(desc)) => {
            let tokenizer = args.tokenizer.as_deref().ok_or_else(|| anyhow!("--init needs --tokenizer"))?;
            let dir = work.join("model");
            align_core::model::init::init_model(desc, tokenizer, &dir, None)?;
            dir
        }
        (None, None) => bail!("give --model or --init"),
    };
    let config = ModelConfig::from_dir(&model)?;
    let tok = ModelTokenizer::from_dir(&model)?;
    let data = write_data(&args, &tok, &work)?;
    let reward = if args.stage == BenchStage::Ppo {
        let dir = work.join("reward-model");
        write_reward_model(&model, &tok, &dir)?;
        Some(dir)
    } else {
        None
    };
    let run = work.join("run");
    let (kind, section) = match args.stage {
        BenchStage::Sft => (StageKind::Sft, "sft"),
        BenchStage::Dpo => (StageKind::Dpo, "dpo"),
        BenchStage::Ppo => (StageKind::Ppo, "ppo"),
        BenchStage::Grpo => (StageKind::Grpo, "grpo"),
    };
    let table = stage_table(&args, &model, config.max_position_embeddings, &data, &run, reward.as_deref())?;
    let origin = work.join("bench.toml");
    std::fs::write(&origin, toml::to_string(&table)?)?;
    let cfg = LoadedConfig::from_table(table, &origin, &[], section)?;

    phases::enable(true);
    let summary = train_stage(kind, &cfg, true, None);
    phases::enable(false);
    let summary = summary?;

    let lines: Vec<Value> = std::fs::read_to_string(run.join(align_runs::files::METRICS))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get(metrics::TIME_STEP).is_some())
        .collect();
    let measured: Vec<&Value> = lines.iter().skip(args.warmup_steps as usize).collect();
    if measured.is_empty() {
        bail!("the run logged {} timed steps, none after the {} warm-up steps", lines.len(), args.warmup_steps);
    }
    let get = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let col = |k: &str| measured.iter().map(|v| get(v, k)).collect::<Vec<_>>();
    let seconds: f64 = col(metrics::TIME_STEP).iter().sum();
    let tokens: f64 = col(metrics::TOKENS).iter().sum();
    let generated: f64 = col(metrics::GENERATED_TOKENS).iter().sum();

    let device = align_core::model::device::parse_device(&args.device)?;
    let device = if args.device == "auto" && tch::Cuda::is_available() { Device::Cuda(0) } else { device };
    let dtype = match args.dtype.as_deref() {
        Some("bf16") => Kind::BFloat16,
        Some("f16") => Kind::Half,
        Some("f32") => Kind::Float,
        Some(other) => bail!("--dtype {other}: expected f32, bf16 or f16"),
        None if device.is_cuda() => Kind::BFloat16,
        None => Kind::Float,
    };
    let gpu = device.is_cuda().then(gpu_name).flatten();
    let (peak, peak_source) = match (args.peak_tflops, &gpu) {
        (Some(p), _) => (Some(p), "--peak-tflops".to_string()),
        (None, Some(name)) => match known_gpu_peak(name) {
            Some(p) => (Some(p), format!("{name}: dense bf16 peak from the table")),
            None => (None, format!("{name}: not in the table of known GPUs; give --peak-tflops")),
        },
        (None, None) if device.is_cuda() => (None, "GPU name unknown (no nvidia-smi); give --peak-tflops".into()),
        (None, None) => {
            (Some(measured_matmul_tflops(device, dtype)?), format!("a {dtype:?} matmul measured on this CPU"))
        }
    };
    let context = match args.stage {
        BenchStage::Sft | BenchStage::Dpo => args.seq,
        BenchStage::Ppo | BenchStage::Grpo => args.seq + args.new_tokens,
    };
    let (train_flops, gen_flops) = flops_per_token(&config, args.method == "lora", context);
    let achieved = (tokens * train_flops + generated * gen_flops) / seconds.max(1e-12) / 1e12;
    let mfu = peak.map(|p| achieved / p);
    let report = json!({
        "stage": section,
        "method": args.method,
        "model": model.display().to_string(),
        "model_type": format!("{:?}", config.model_type),
        "device": format!("{device:?}"),
        "gpu": gpu,
        "dtype": format!("{dtype:?}"),
        "seq": args.seq,
        "batch": args.batch,
        "new_tokens": if matches!(args.stage, BenchStage::Ppo | BenchStage::Grpo) { Some(args.new_tokens) } else { None },
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps_measured": measured.len(),
        "warmup_steps": args.warmup_steps,
        "tokens_per_second": tokens / seconds.max(1e-12),
        "generated_tokens_per_second": if generated > 0.0 { Some(generated / seconds.max(1e-12)) } else { None },
        "step_seconds_median": median(col(metrics::TIME_STEP)),
        "forward_seconds_median": median(col(metrics::TIME_FORWARD)),
        "backward_seconds_median": median(col(metrics::TIME_BACKWARD)),
        "optimizer_seconds_median": median(col(metrics::TIME_OPTIMIZER)),
        "generation_seconds_median": median(col(metrics::TIME_GENERATION)),
        "model_tflops_per_second": achieved,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": mfu,
        "peak_rss_bytes": summary.peak_rss_bytes,
        "gpu_memory_bytes": device.is_cuda().then(gpu_memory_of_this_process).flatten(),
        "matmul_parameters": matmul_parameters(&config, args.method == "lora").0,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
    println!(
        "bench train {section} ({}, {:?}, {:?}, seq {}, batch {}{}): {} measured steps after {} warm-up",
        args.method,
        config.model_type,
        dtype,
        args.seq,
        args.batch,
        if args.gradient_checkpointing { ", gradient checkpointing" } else { "" },
        measured.len(),
        args.warmup_steps
    );
    println!("  tokens/s            {:.1}", f("tokens_per_second"));
    if generated > 0.0 {
        println!("  generated tokens/s  {:.1}", f("generated_tokens_per_second"));
    }
    println!(
        "  step (median)       {:.4} s = forward {:.4} + backward {:.4} + optimizer {:.4} + generation {:.4}",
        f("step_seconds_median"),
        f("forward_seconds_median"),
        f("backward_seconds_median"),
        f("optimizer_seconds_median"),
        f("generation_seconds_median")
    );
    match mfu {
        Some(m) => println!(
            "  MFU                 {:.2} % ({achieved:.3} model TFLOP/s of {:.3}: {peak_source})",
            m * 100.0,
            peak.unwrap_or(0.0)
        ),
        None => println!("  MFU                 - ({achieved:.3} model TFLOP/s; {peak_source})"),
    }
    if let Some(b) = summary.peak_rss_bytes {
        println!("  peak RSS            {}", align_core::train::plan::human_bytes(b));
    }
    if let Some(b) = report["gpu_memory_bytes"].as_u64() {
        println!(
            "  GPU memory held     {} (nvidia-smi, the caching allocator's reservation)",
            align_core::train::plan::human_bytes(b)
        );
    }
    Ok(())
}

/// A temporary work folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let dir = std::env::temp_dir().join(format!("align-bench-train-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpus_and_flops_per_token() {
        assert_eq!(known_gpu_peak("NVIDIA H200"), Some(989.0));
        assert_eq!(known_gpu_peak("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(known_gpu_peak("NVIDIA GeForce RTX 4090"), Some(165.0));
        assert_eq!(known_gpu_peak("Tesla T4"), None);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-llama");
        let c = ModelConfig::from_dir(&dir).unwrap();
        let (n, trainable) = matmul_parameters(&c, false);
        assert_eq!(n, trainable);
        let (_, lora) = matmul_parameters(&c, true);
        assert!(lora > 0.0 && lora < n);
        let (full, generation) = flops_per_token(&c, false, 0);
        assert_eq!((full, generation), (6.0 * n, 2.0 * n), "6N for training, 2N for generation");
        let (with_attention, _) = flops_per_token(&c, false, 128);
        let q = (c.num_attention_heads * c.head_dim) as f64;
        assert_eq!(with_attention - full, 12.0 * c.num_hidden_layers as f64 * q * 128.0);
    }
}
