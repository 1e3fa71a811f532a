//! `align plan`: prints the memory plan of a training run (weights, gradients, optimizer state,
//! activations, logits per device, and the total) without loading any weights.
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tch::Device;

use align_core::hf::checkpoint::resolve_model_dir;
use align_core::hf::config::ModelConfig;
use align_core::model::device::parse_dtype;
use align_core::model::lora_layer::{LoraConfig, LoraTargets};
use align_core::train::optim::OptimizerKind;
use align_core::train::plan::{last_layers_parameters, plan_memory, PlanMethod, PlanSettings};

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Full,
    Lora,
    Qlora,
    Freeze,
}

#[derive(Args)]
pub struct PlanArgs {
    /// Model folder or hub id (found in the local HF cache); only its config.json is read.
    #[arg(long)]
    model: String,
    #[arg(long, value_enum, default_value = "full")]
    method: MethodArg,
    /// Tokens per sequence.
    #[arg(long)]
    seq: i64,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch: i64,
    /// Keep only each layer's input and recompute its activations in backward.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// ZeRO stage (0–2, `train.zero`): the optimizer state partitioned over --world ranks (1, 2;
    /// ZeRO-2's gradients are freed only after the backward, so its peak is ZeRO-1's).
    #[arg(long, default_value_t = 0)]
    zero: u8,
    /// Ranks of the data-parallel job (torchrun's WORLD_SIZE).
    #[arg(long, default_value_t = 1)]
    world: i64,
    /// adamw or adamw8bit, as `[train] optimizer`.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// f32, bf16 or f16 (default: f32 for cpu, bf16 for cuda).
    #[arg(long)]
    dtype: Option<String>,
    /// cpu (adds the runtime's resident baseline) or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// LoRA / QLoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_r: i64,
    /// LoRA targets: "all-linear", a regular expression, or a comma-separated list of module names.
    #[arg(long, default_value = "q_proj,v_proj")]
    lora_targets: String,
    /// LoRA dropout (> 0 keeps a mask and a dropped copy of each adapted input).
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// QLoRA: quantise the 4-bit base's absmax too (double quantisation).
    #[arg(long)]
    double_quant: bool,
    /// Freeze: the decoder layers that train (the last N).
    #[arg(long)]
    freeze_last_layers: Option<i64>,
    /// As `[train] loss_chunk_tokens` (0 = the whole [batch, seq, vocab] logits at once).
    #[arg(long, default_value_t = 0)]
    loss_chunk_tokens: i64,
}

fn targets(spec: &str) -> LoraTargets {
    if spec == "all-linear" || !spec.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ',' || c == '.') {
        LoraTargets::Pattern(spec.to_string())
    } else {
        LoraTargets::Names(spec.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
    }
}

/// The LoRA of `--lora-r`, `--lora-targets` and `--lora-dropout`.
fn lora_of(a: &PlanArgs) -> LoraConfig {
    LoraConfig { r: a.lora_r, targets: targets(&a.lora_targets), dropout: a.lora_dropout, ..Default::default() }
}

pub fn run(a: PlanArgs) -> Result<()> {
    let dir = resolve_model_dir(&a.model)?;
    let config = ModelConfig::from_dir(&dir)?;
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    let dtype = parse_dtype(a.dtype.as_deref(), device).context("--dtype")?;
    let optimizer = OptimizerKind::parse(&a.optimizer).context("--optimizer")?;
    if a.freeze_last_layers.is_some() && !matches!(a.method, MethodArg::Freeze) {
        bail!("--freeze-last-layers is read only with --method freeze");
    }
    let lora_flags = a.lora_r != 8 || a.lora_targets != "q_proj,v_proj" || a.lora_dropout != 0.05;
    if lora_flags && !matches!(a.method, MethodArg::Lora | MethodArg::Qlora) {
        bail!("--lora-r / --lora-targets / --lora-dropout are read only with --method lora or qlora");
    }
    if a.double_quant && !matches!(a.method, MethodArg::Qlora) {
        bail!("--double-quant is read only with --method qlora");
    }
    let method = match a.method {
        MethodArg::Full => PlanMethod::Full,
        MethodArg::Lora => PlanMethod::Lora { lora: lora_of(&a) },
        MethodArg::Qlora => PlanMethod::Qlora { lora: lora_of(&a), double_quant: a.double_quant },
        MethodArg::Freeze => {
            let n = a.freeze_last_layers.unwrap_or(1);
            if !(1..=config.num_hidden_layers).contains(&n) {
                bail!(
                    "--freeze-last-layers: expected 1..={} (the model's decoder layers), found {n}",
                    config.num_hidden_layers
                );
            }
            PlanMethod::Freeze { trainable: last_layers_parameters(&config, n) }
        }
    };
    let settings = PlanSettings {
        dtype,
        method,
        optimizer,
        zero_stage: a.zero,
        world: a.world,
        seq: a.seq,
        batch: a.batch,
        checkpoint_every: usize::from(a.gradient_checkpointing),
        loss_chunk_tokens: a.loss_chunk_tokens,
        cpu: device == Device::Cpu,
    };
    let plan = plan_memory(&config, &settings).with_context(|| format!("{}", dir.display()))?;
    println!("{} ({}, {:?}, {})", dir.display(), config.model_type.as_str(), dtype, optimizer.as_str());
    for line in plan.lines(&settings) {
        println!("{line}");
    }
    Ok(())
}
