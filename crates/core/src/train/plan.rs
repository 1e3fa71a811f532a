//! The memory plan of a training run: weights, gradients, optimizer state, activations and
//! logits per device, and the total — a pure function of the model's `config.json` and the
//! run's settings (`align plan`, and the trainer's first log line).
//!
//! The activations are what autograd saves in our decoder (`model/decoder.rs`), per token and
//! layer: each RMSNorm keeps its input in f32 and its normalised output; attention keeps q, k
//! (after RoPE), v, its output and the log-sum-exp, and `o_proj` its (reshaped) input when it
//! trains; the SiLU-gated MLP keeps the gate and up outputs, SiLU(gate) and their product; a
//! trained projection keeps its input (a frozen one only its weight); the LoRA projections of
//! one input keep it once, each its boolean dropout mask and `x·Aᵀ` (DoRA: a float noise mask
//! and a dropped copy of the input, as `at::dropout` makes them on CPU). The loss keeps the `[B, T, V]` logits' f32 log-softmax and, in backward,
//! its gradient (per chunk with `loss_chunk_tokens`). Calibrated against measured peaks on
//! SmolLM2-135M on CPU (docs/memory.md).
use std::collections::BTreeSet;

use anyhow::{ensure, Result};
use tch::Kind;

use crate::hf::config::ModelConfig;
use crate::model::lora_layer::LoraConfig;
use crate::train::config::TrainSection;
use crate::train::optim::{OptimizerKind, BLOCK_SIZE, MIN_8BIT_SIZE};

/// What trains.
#[derive(Debug, Clone)]
pub enum PlanMethod {
    Full,
    /// LoRA adapters as the config says (ranks per module, the projections `targets` and
    /// `layers_to_transform` select, DoRA's magnitudes; dropout > 0 keeps a boolean mask per
    /// adapter, under DoRA a float mask and a dropped copy of the input).
    Lora {
        lora: LoraConfig,
    },
    /// LoRA over a 4-bit (NF4) base: 0.5 byte per base weight of the projections plus an f32
    /// absmax per 64 (8-bit absmax + an f32 per 256 of them with double quantisation).
    Qlora {
        lora: LoraConfig,
        double_quant: bool,
    },
    /// Only the parameters named here train (the live run's names, or the last layers).
    Freeze {
        trainable: BTreeSet<String>,
    },
}

/// The settings a plan is made for.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    /// Weight dtype: Float, BFloat16 or Half.
    pub dtype: Kind,
    pub method: PlanMethod,
    pub optimizer: OptimizerKind,
    /// ZeRO stage 0–2 (`train.zero`) over `world` ranks (docs/distributed.md).
    pub zero_stage: u8,
    pub world: i64,
    /// Tokens per sequence and sequences per micro-batch.
    pub seq: i64,
    pub batch: i64,
    /// Activation checkpointing of every k-th layer (`[train] gradient_checkpointing(_every)`;
    /// 0 = off, 1 = every layer).
    pub checkpoint_every: usize,
    /// 0 = the whole `[B, T, V]` logits at once.
    pub loss_chunk_tokens: i64,
    /// Add the CPU runtime's resident baseline (libtorch, tokenizer, allocator).
    pub cpu: bool,
}

/// Bytes per device, by part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryPlan {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
    /// The optimizer step's temporaries or a checkpoint's copy, whichever is larger; they do not
    /// coexist with the activations.
    pub step_scratch: u64,
    /// The runtime's resident baseline on CPU (0 on CUDA).
    pub runtime: u64,
    pub total: u64,
    pub trainable_parameters: u64,
    pub parameters: u64,
}

/// Resident memory of the align process on CPU besides the model: libtorch (the PyPI wheel's
/// libraries, CUDA build, mapped and touched), its allocator, the tokenizer and the data.
/// Measured: a 2-step SFT run of the 2-layer test model (weights, state and activations under
/// 3 MiB) peaks at 379 MiB resident with torch 2.11 on x86-64 Linux.
pub const CPU_RUNTIME_BYTES: u64 = 375 << 20;

impl PlanSettings {
    /// The settings of a live run: `[train]` (`batch_size`, `max_length` as the sequence length:
    /// the longest a batch can be, `optimizer`, `loss_chunk_tokens`), its dtype and device, and
    /// what trains (`lora`: the attached adapters' config; otherwise the trainable names).
    /// `gradient_checkpointing(_every)`, and 4-bit quantisation (`quantize`, `double_quant`:
    /// LoRA becomes QLoRA).
    pub fn of_run(
        t: &TrainSection,
        dtype: Kind,
        cpu: bool,
        lora: Option<&LoraConfig>,
        trainable: BTreeSet<String>,
        full: bool,
    ) -> PlanSettings {
        let four_bit = match t.quantization() {
            Ok(Some(crate::model::quant::Quantization::FourBit { double_quant, .. })) => Some(double_quant),
            _ => None,
        };
        let method = match (lora, four_bit) {
            (Some(l), Some(double_quant)) => PlanMethod::Qlora { lora: l.clone(), double_quant },
            (Some(l), None) => PlanMethod::Lora { lora: l.clone() },
            (None, _) if full => PlanMethod::Full,
            (None, _) => PlanMethod::Freeze { trainable },
        };
        PlanSettings {
            dtype,
            method,
            optimizer: t.optimizer,
            // a data-parallel run plans for its own world and ZeRO level
            zero_stage: if align_dist::world().size() > 1 { t.zero } else { 0 },
            world: align_dist::world().size() as i64,
            seq: t.max_length as i64,
            batch: t.batch_size as i64,
            checkpoint_every: t.checkpoint_every(),
            loss_chunk_tokens: t.loss_chunk_tokens as i64,
            cpu,
        }
    }
}

/// Every parameter of the decoder by HF name with its shape.
pub fn parameter_shapes(c: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            out.push((p(&format!("{name}.weight")), vec![rows, cols]));
            let bias = match name {
                "self_attn.o_proj" => c.o_bias,
                n if n.starts_with("self_attn") => c.qkv_bias,
                _ => c.mlp_bias,
            };
            if bias {
                out.push((p(&format!("{name}.bias")), vec![rows]));
            }
        }
        if c.qk_norm {
            out.push((p("self_attn.q_norm.weight"), vec![hd]));
            out.push((p("self_attn.k_norm.weight"), vec![hd]));
        }
        out.push((p("input_layernorm.weight"), vec![h]));
        out.push((p("post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
}

/// The projection paths (`model.layers.L.self_attn.q_proj`) of the decoder, as LoRA sees them.
pub fn projection_paths(c: &ModelConfig) -> Vec<String> {
    let mut out = Vec::new();
    for l in 0..c.num_hidden_layers {
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
            out.push(format!("model.layers.{l}.{m}"));
        }
        for m in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
            out.push(format!("model.layers.{l}.{m}"));
        }
    }
    out
}

/// The parameters of the last `n` decoder layers (what `[freeze] last_layers = n` trains).
pub fn last_layers_parameters(c: &ModelConfig, n: i64) -> BTreeSet<String> {
    let first = c.num_hidden_layers - n;
    parameter_shapes(c)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| {
            name.strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l >= first)
        })
        .collect()
}

fn bytes_of(kind: Kind) -> Result<u64> {
    ensure!(
        matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half),
        "the plan's dtype is f32, bf16 or f16, not {kind:?}"
    );
    Ok(kind.elt_size_in_bytes() as u64)
}

/// Optimizer state bytes of one trainable tensor of `n` elements.
fn optimizer_bytes(kind: OptimizerKind, n: u64, half: bool) -> u64 {
    let moments = if kind == OptimizerKind::Adamw8bit && n as i64 >= MIN_8BIT_SIZE {
        2 * n + 8 * n.div_ceil(BLOCK_SIZE as u64)
    } else {
        8 * n
    };
    moments + if half { 4 * n } else { 0 }
}

/// The memory plan of `settings` for the model `c`.
pub fn plan_memory(c: &ModelConfig, s: &PlanSettings) -> Result<MemoryPlan> {
    let w = bytes_of(s.dtype)?;
    let half = w != 4;
    ensure!(s.seq > 0 && s.batch > 0, "seq and batch must be positive (got {} and {})", s.seq, s.batch);
    ensure!(
        s.zero_stage <= 2,
        "ZeRO stage is 0, 1 or 2, not {} (ZeRO-3, sharded weights, is not implemented)",
        s.zero_stage
    );
    ensure!(s.world >= 1, "world size must be at least 1, got {}", s.world);
    let shapes = parameter_shapes(c);
    let numel = |shape: &[i64]| shape.iter().product::<i64>() as u64;
    let parameters: u64 = shapes.iter().map(|(_, sh)| numel(sh)).sum();

    // LoRA: the adapted projections, their (in, out) and rank
    let (lora, adapted): (Option<&LoraConfig>, Vec<(String, i64, i64, i64)>) = match &s.method {
        PlanMethod::Lora { lora } | PlanMethod::Qlora { lora, .. } => {
            let paths = lora.targets.select(&projection_paths(c))?;
            let mut dims = Vec::new();
            for p in paths.into_iter().filter(|p| lora.transforms_layer_of(p)) {
                if let Some((_, sh)) = shapes.iter().find(|(n, _)| *n == format!("{p}.weight")) {
                    let r = lora.rank_of(&p)?;
                    dims.push((p, sh[1], sh[0], r));
                }
            }
            (Some(lora), dims)
        }
        _ => (None, Vec::new()),
    };
    let trains = |name: &str| match &s.method {
        PlanMethod::Full => true,
        PlanMethod::Freeze { trainable } => trainable.contains(name),
        _ => false,
    };

    // weights (a 4-bit base for the projections under QLoRA) and the trained tensors
    let mut weights = 0u64;
    let mut trainable: Vec<u64> = Vec::new();
    for (name, shape) in &shapes {
        let n = numel(shape);
        let projection = name.contains("_proj.weight");
        weights += match &s.method {
            PlanMethod::Qlora { double_quant, .. } if projection => {
                let blocks = n.div_ceil(64);
                n / 2 + if *double_quant { blocks + 4 * blocks.div_ceil(256) } else { 4 * blocks }
            }
            _ => n * w,
        };
        if trains(name) {
            trainable.push(n);
        }
    }
    if let Some(l) = lora {
        for (_, input, output, r) in &adapted {
            let (a, b) = ((r * input) as u64, (output * r) as u64);
            weights += (a + b) * w;
            trainable.extend([a, b]);
            if l.use_dora {
                weights += *output as u64 * w;
                trainable.push(*output as u64);
            }
        }
    }
    let trainable_parameters: u64 = trainable.iter().sum();
    let gradients = trainable_parameters * w;
    let mut optimizer: u64 = trainable.iter().map(|&n| optimizer_bytes(s.optimizer, n, half)).sum();
    let world = s.world as u64;
    // ZeRO-1 and 2 partition the optimizer state; ZeRO-2 frees the other ranks' gradients only
    // after the backward pass, so its peak holds them all (docs/distributed.md)
    if s.zero_stage >= 1 {
        optimizer = optimizer.div_ceil(world);
    }

    // activations saved per token of one layer
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64);
    let adapter_of = |l: i64, m: &str| adapted.iter().find(|(p, ..)| p == &format!("model.layers.{l}.{m}"));
    // a projection's input is kept when the projection trains, or once for its LoRA path
    let input_kept = |l: i64, modules: &[&str], dim: u64| -> u64 {
        let mut bytes = 0;
        if modules.iter().any(|m| trains(&format!("model.layers.{l}.{m}.weight"))) {
            bytes += dim * w;
        }
        if let Some(lora) = lora {
            let adapters: Vec<_> = modules.iter().filter_map(|m| adapter_of(l, m)).collect();
            let with_lora = adapters.len() as u64;
            if with_lora > 0 {
                // the input once for the adapters' first products (shared with a trained
                // projection), and with dropout a boolean mask per adapter (model/dropout_linear.rs)
                if bytes == 0 {
                    bytes += dim * w;
                }
                if lora.dropout > 0.0 {
                    bytes += with_lora * if lora.use_dora { 2 * dim * w } else { dim };
                }
                bytes += adapters.iter().map(|(_, _, _, r)| *r as u64).sum::<u64>() * w;
                if lora.use_dora {
                    // DoRA keeps the base and the adapter outputs for the magnitudes' gradient
                    bytes += adapters.iter().map(|(_, _, out, _)| 2 * *out as u64 * 4).sum::<u64>();
                }
            }
        }
        bytes
    };
    let norm = 4 * h + h * w;
    let attention = (2 * q + 2 * kv) * w + 4 * c.num_attention_heads as u64;
    let mlp = 4 * i * w;
    let layer_bytes = |l: i64| {
        2 * norm
            + attention
            + mlp
            + input_kept(l, &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], h)
            + input_kept(l, &["self_attn.o_proj"], q)
            + input_kept(l, &["mlp.gate_proj", "mlp.up_proj"], h)
            + input_kept(l, &["mlp.down_proj"], i)
    };
    // layers before the first one with something to train see no gradient and save nothing
    let first_with_grad = if trains("model.embed_tokens.weight") {
        0
    } else {
        (0..c.num_hidden_layers)
            .find(|l| {
                let prefix = format!("model.layers.{l}.");
                shapes.iter().any(|(n, _)| n.starts_with(&prefix) && trains(n))
                    || adapted.iter().any(|(p, ..)| p.starts_with(&prefix))
            })
            .unwrap_or(c.num_hidden_layers)
    };
    let per_token_layers: Vec<u64> =
        (0..c.num_hidden_layers).map(|l| if l < first_with_grad { 0 } else { layer_bytes(l) }).collect();
    let tokens = (s.seq * s.batch) as u64;
    let saved = if s.checkpoint_every > 0 {
        // a checkpointed layer keeps its input, plus its activations while it is recomputed;
        // the others keep theirs
        let k = s.checkpoint_every;
        let checkpointed = |l: usize| l % k == 0;
        let kept: u64 = per_token_layers
            .iter()
            .enumerate()
            .map(|(l, &b)| {
                if !checkpointed(l) {
                    b
                } else if b > 0 {
                    h * w
                } else {
                    0
                }
            })
            .sum();
        let recomputed =
            per_token_layers.iter().enumerate().filter(|(l, _)| checkpointed(*l)).map(|(_, &b)| b).max().unwrap_or(0);
        tokens * (kept + recomputed)
    } else {
        tokens * per_token_layers.iter().sum::<u64>()
    };
    // the final norm, and backward's working set: the gradient of the hidden states and of the
    // widest intermediate of the layer being differentiated
    let head_input = if trains("lm_head.weight") || (c.tie_word_embeddings && trains("model.embed_tokens.weight")) {
        h * w
    } else {
        0
    };
    let activations = saved + tokens * (norm + head_input + 2 * h * 4 + 2 * i * w);

    // logits: the head's output (in dtype), its f32 log-softmax, and in backward its gradient
    let logit_tokens = if s.loss_chunk_tokens > 0 { (s.loss_chunk_tokens as u64).min(tokens) } else { tokens };
    let v = c.vocab_size as u64;
    let logits = logit_tokens * v * (w + if half { 4 } else { 0 } + 4 + 4);

    // the optimizer step's temporaries (on the largest trained tensor), or a checkpoint's copy
    let largest = trainable.iter().copied().max().unwrap_or(0);
    let step_temporaries = match s.optimizer {
        OptimizerKind::Adamw => 16 * largest,
        OptimizerKind::Adamw8bit => 40 * largest,
    };
    let checkpoint_copy = if matches!(s.method, PlanMethod::Full | PlanMethod::Freeze { .. }) {
        (parameters * w).max(optimizer)
    } else {
        optimizer.max(trainable_parameters * w)
    };
    let step_scratch = step_temporaries.max(checkpoint_copy);
    let runtime = if s.cpu { CPU_RUNTIME_BYTES } else { 0 };
    let total = runtime + weights + gradients + optimizer + (activations + logits).max(step_scratch);
    Ok(MemoryPlan {
        weights,
        gradients,
        optimizer,
        activations,
        logits,
        step_scratch,
        runtime,
        total,
        trainable_parameters,
        parameters,
    })
}

/// `1.23 GiB`, `456.7 MiB`.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

impl MemoryPlan {
    /// The plan as lines of a table (part, bytes), the total last.
    pub fn lines(&self, s: &PlanSettings) -> Vec<String> {
        let mut out = vec![format!(
            "memory plan per device: {} parameters, {} trained; {} × {} tokens{}{}",
            self.parameters,
            self.trainable_parameters,
            s.batch,
            s.seq,
            match s.checkpoint_every {
                0 => String::new(),
                1 => ", gradient checkpointing".to_string(),
                k => format!(", gradient checkpointing every {k} layers"),
            },
            if s.loss_chunk_tokens > 0 {
                format!(", loss chunks of {} tokens", s.loss_chunk_tokens)
            } else {
                String::new()
            }
        )];
        for (part, bytes) in [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
            ("step scratch", self.step_scratch),
            ("runtime", self.runtime),
        ] {
            out.push(format!("  {part:<13} {:>12}", human_bytes(bytes)));
        }
        out.push(format!("  {:<13} {:>12}", "total", human_bytes(self.total)));
        if s.zero_stage > 0 {
            out.push(format!(
                "  (ZeRO stage {} over {} ranks: optimizer state partitioned; ZeRO-2's gradients are freed after the backward, so its peak holds them all)",
                s.zero_stage, s.world
            ));
        }
        out
    }
}
