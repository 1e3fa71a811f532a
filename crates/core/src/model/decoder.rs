//! The Llama-family decoder (llama, mistral, qwen2, qwen3): a trunk that returns hidden states for
//! every position and a separate LM head, with parameters stored under their HF names.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::hf::config::{ModelConfig, RopeScaling};
use crate::model::ia3_layer::{Ia3Config, Ia3Vector};
use crate::model::io::remove_variables;
use crate::model::lora_layer::{LoraAdapter, LoraConfig};
use crate::model::prompt_layer::{PromptLearningConfig, VirtualTokens};
use crate::model::quant::{Quantization, QuantizedWeight};
use crate::model::quant_linear::quantized_linear;
use crate::model::recompute;

/// A projection `y = x Wᵀ + b` with weight `[out, in]` as HF stores it, plus the LoRA update
/// `scaling · dropout(x) Aᵀ Bᵀ` when an adapter is attached and enabled. The weight is a variable
/// of the model's `VarStore`, or, in a quantised model, a frozen quantised state that the
/// forward (and backward) pass dequantises on the fly; then the dense weight no longer exists.
#[derive(Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    /// Attached by `lora::attach_lora` / `lora::load_adapter`; removed by `lora::merge_lora`.
    pub lora: Option<LoraAdapter>,
    /// Attached by `ia3::attach_ia3` / `ia3::load_ia3_adapter`; removed by `ia3::merge_ia3`.
    pub ia3: Option<Ia3Vector>,
    /// Several LoRA adapters served together on this base (`lora::load_adapter_bank`), indexed
    /// by adapter number (None where an adapter leaves this projection alone). Each batch row
    /// takes the adapter the trunk's routing gives it (`Trunk::set_adapter_rows`), or none.
    pub bank: Vec<Option<LoraAdapter>>,
}

/// The weight of a [`Linear`].
#[derive(Debug)]
pub enum LinearWeight {
    /// A variable of the model's `VarStore`, under its HF name.
    Dense(Tensor),
    /// Frozen and quantised (see `model::quant`), outside the `VarStore`.
    Quantized(QuantizedWeight),
}

impl LinearWeight {
    /// The dense weight; None when quantised.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            LinearWeight::Dense(w) => Some(w),
            LinearWeight::Quantized(_) => None,
        }
    }

    fn shallow_clone(&self) -> Self {
        match self {
            LinearWeight::Dense(w) => LinearWeight::Dense(w.shallow_clone()),
            LinearWeight::Quantized(q) => LinearWeight::Quantized(q.shallow_clone()),
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> Vec<i64> {
        match self {
            LinearWeight::Dense(w) => w.size(),
            LinearWeight::Quantized(q) => q.shape(),
        }
    }
}

impl Linear {
    fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = LinearWeight::Dense(p.zeros("weight", &[out_dim, in_dim]));
        let bias = bias.then(|| p.zeros("bias", &[out_dim]));
        Linear { weight, bias, lora: None, ia3: None, bank: Vec::new() }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(ia3) = self.ia3.as_ref().filter(|v| v.is_enabled()) {
            let y = self.base_forward(&ia3.scale_input(x)?)?;
            return ia3.scale_output(&y);
        }
        let y = self.base_forward(x)?;
        if let Some(routing) = self.bank.iter().flatten().next().and_then(|a| a.mode.adapter_rows()) {
            let mut y = y;
            for (adapter, rows) in routing {
                if let Some(Some(lora)) = self.bank.get(adapter) {
                    let out = self.adapted(lora, &x.f_index_select(0, &rows)?, &y.f_index_select(0, &rows)?)?;
                    y = y.f_index_copy(0, &rows, &out)?;
                }
            }
            return Ok(y);
        }
        let Some(lora) = &self.lora else { return Ok(y) };
        if !lora.is_enabled() {
            return match lora.initial_update(x)? {
                Some(back) => Ok(y.f_add(&back)?),
                None => Ok(y),
            };
        }
        self.adapted(lora, x, &y)
    }

    /// The output of this projection with `lora` applied, given the base output `y` of `x`.
    fn adapted(&self, lora: &LoraAdapter, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if lora.magnitude.is_some() {
            let w = match &self.weight {
                LinearWeight::Dense(w) => w.shallow_clone(),
                LinearWeight::Quantized(q) => q.dequantize(lora.lora_a.kind())?,
            };
            return lora.dora_output(x, y, &w, self.bias.as_ref());
        }
        Ok(y.f_add(&lora.forward(x)?)?)
    }

    /// `x Wᵀ + b` of the base weight alone.
    fn base_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Dense(w) => x.f_linear(w, self.bias.as_ref())?,
            LinearWeight::Quantized(q) => {
                let y = quantized_linear(x, q)?;
                match &self.bias {
                    Some(b) => y.f_add(b)?,
                    None => y,
                }
            }
        })
    }

    pub fn in_features(&self) -> i64 {
        self.weight.shape()[1]
    }

    /// The same layer over the same tensors (parameters and their gradients are shared).
    fn shallow_clone(&self) -> Self {
        Linear {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            lora: self.lora.as_ref().map(LoraAdapter::shallow_clone),
            ia3: self.ia3.as_ref().map(Ia3Vector::shallow_clone),
            bank: self.bank.iter().map(|a| a.as_ref().map(LoraAdapter::shallow_clone)).collect(),
        }
    }

    /// True when the forward pass draws random numbers (LoRA dropout in training mode).
    fn draws_random(&self) -> bool {
        self.lora.as_ref().is_some_and(|l| l.is_enabled() && l.dropout > 0.0 && l.mode.training())
    }

    pub fn out_features(&self) -> i64 {
        self.weight.shape()[0]
    }

    /// True when the weight is held quantised.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_))
    }
}

/// Run-time switches a model shares with its LoRA adapters: training mode (adapter dropout on)
/// and whether adapters take part in the forward pass. Both can be flipped through a shared
/// reference to the model (`CausalLm`, `ScalarModel`), whose trunk owns them.
#[derive(Debug)]
pub struct RunMode {
    training: AtomicBool,
    adapters_enabled: AtomicBool,
    /// Activation checkpointing: every k-th decoder layer (0 = off).
    checkpoint_every: AtomicUsize,
    /// Which batch rows take which adapter of a served bank (adapter number, row indices).
    adapter_rows: std::sync::Mutex<Option<Vec<(usize, Tensor)>>>,
}

impl RunMode {
    fn new() -> Self {
        RunMode {
            training: AtomicBool::new(false),
            adapters_enabled: AtomicBool::new(true),
            checkpoint_every: AtomicUsize::new(0),
            adapter_rows: std::sync::Mutex::new(None),
        }
    }

    /// The rows of each served adapter in the current forward pass (None: no bank routing).
    fn adapter_rows(&self) -> Option<Vec<(usize, Tensor)>> {
        let rows = self.adapter_rows.lock().unwrap_or_else(|e| e.into_inner());
        rows.as_ref().map(|r| r.iter().map(|(a, t)| (*a, t.shallow_clone())).collect())
    }

    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    pub fn adapters_enabled(&self) -> bool {
        self.adapters_enabled.load(Ordering::Relaxed)
    }
}

/// Root-mean-square layer norm computed in f32, as HF's `LlamaRMSNorm`.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: p.ones("weight", &[dim]), eps }
    }

    fn shallow_clone(&self) -> Self {
        RmsNorm { weight: self.weight.shallow_clone(), eps: self.eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let x32 = x.f_to_kind(Kind::Float)?;
        let var = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?.f_to_kind(kind)?;
        Ok(normed.f_mul(&self.weight)?)
    }
}

/// RoPE inverse frequencies for a head dimension, following the configured `rope_type`.
pub fn rope_inv_freq(theta: f64, head_dim: i64, scaling: &RopeScaling) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Cosines and sines for the positions of one forward pass, `[B, 1, T, head_dim]`.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], -1)?)
}

impl RopeTables {
    fn shallow_clone(&self) -> Self {
        RopeTables { cos: self.cos.shallow_clone(), sin: self.sin.shallow_clone() }
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_mul(&self.cos)?.f_add(&rotate_half(x)?.f_mul(&self.sin)?)?)
    }
}

/// Keys and values of earlier positions, preallocated for `capacity` positions. With prompt or
/// prefix tuning the first `offset` stored positions are the virtual tokens' (added by the
/// trunk's first forward pass); `len` and `capacity` as callers see them count real tokens only.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Stored positions, virtual ones included.
    len: i64,
    /// Allocated positions, virtual ones included.
    capacity: i64,
    /// Virtual positions at the start.
    offset: i64,
}

impl KvCache {
    pub fn new(config: &ModelConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> Result<Self> {
        let shape = [batch, config.num_key_value_heads, capacity, config.head_dim];
        let layers = (0..config.num_hidden_layers)
            .map(|_| Ok((Tensor::f_zeros(shape, (kind, device))?, Tensor::f_zeros(shape, (kind, device))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers, len: 0, capacity, offset: 0 })
    }

    /// Number of real-token positions already stored.
    pub fn len(&self) -> i64 {
        // before prompt tuning's first pass the virtual positions are reserved, not yet stored
        (self.len - self.offset).max(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real-token positions the cache can hold.
    pub fn capacity(&self) -> i64 {
        self.capacity - self.offset
    }

    /// Makes room for `nv` virtual positions in front of the real ones (an empty cache only).
    fn reserve_virtual(&mut self, nv: i64) -> Result<()> {
        ensure!(self.len == 0 && self.offset == 0, "KV cache: virtual positions can only be added to an empty cache");
        for (k, v) in self.layers.iter_mut() {
            let mut shape = k.size();
            shape[2] = nv + self.capacity;
            *k = Tensor::f_zeros(shape.as_slice(), (k.kind(), k.device()))?;
            *v = Tensor::f_zeros(shape.as_slice(), (v.kind(), v.device()))?;
        }
        self.capacity += nv;
        self.offset = nv;
        Ok(())
    }

    /// Keeps only the given batch rows (used to drop finished sequences during generation).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut() {
            *k = k.f_index_select(0, rows)?;
            *v = v.f_index_select(0, rows)?;
        }
        Ok(())
    }

    /// Batch rows held.
    pub fn rows(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[0])
    }

    /// Makes room for at least `capacity` real-token positions (the stored ones are kept).
    pub fn reserve(&mut self, capacity: i64) -> Result<()> {
        if capacity <= self.capacity() {
            return Ok(());
        }
        let total = self.offset + capacity;
        for (k, v) in self.layers.iter_mut() {
            for t in [k, v] {
                let mut shape = t.size();
                shape[2] = total;
                let grown = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
                grown.f_narrow(2, 0, self.len)?.f_copy_(&t.f_narrow(2, 0, self.len)?)?;
                *t = grown;
            }
        }
        self.capacity = total;
        Ok(())
    }

    /// Moves the stored real-token positions `by` places later (`by` > 0: empty positions are
    /// inserted in front of them) or earlier (`by` < 0: the first `-by` are dropped). Virtual
    /// positions stay in front. Continuous batching aligns rows of different lengths this way.
    pub fn shift(&mut self, by: i64) -> Result<()> {
        let real = self.len - self.offset;
        ensure!(by >= -real, "KV cache: cannot drop {} of {real} positions", -by);
        if by == 0 {
            return Ok(());
        }
        self.reserve(real + by.max(0))?;
        for (k, v) in self.layers.iter_mut() {
            for t in [k, v] {
                let (from, to, n) = if by > 0 {
                    (self.offset, self.offset + by, real)
                } else {
                    (self.offset - by, self.offset, real + by)
                };
                let moved = t.f_narrow(2, from, n)?.f_contiguous()?.f_detach_copy()?;
                t.f_narrow(2, to, n)?.f_copy_(&moved)?;
                if by > 0 {
                    let _ = t.f_narrow(2, self.offset, by)?.f_zero_()?;
                }
            }
        }
        self.len += by;
        Ok(())
    }

    /// Appends the rows of `other` (same stored length and virtual positions) after this cache's.
    pub fn append_rows(&mut self, mut other: KvCache) -> Result<()> {
        ensure!(
            self.len == other.len && self.offset == other.offset,
            "KV cache: rows of {} positions ({} virtual) cannot join rows of {} ({} virtual)",
            other.len,
            other.offset,
            self.len,
            self.offset
        );
        let capacity = self.capacity().max(other.capacity());
        self.reserve(capacity)?;
        other.reserve(capacity)?;
        for ((k, v), (ok, ov)) in self.layers.iter_mut().zip(other.layers) {
            *k = Tensor::f_cat(&[&*k, &ok], 0)?;
            *v = Tensor::f_cat(&[&*v, &ov], 0)?;
        }
        Ok(())
    }
}

/// Causal self-attention with grouped-query heads.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

/// How attention is masked in one forward pass.
pub enum AttnMask {
    /// Plain causal attention over the current positions (no cache, no padding).
    Causal,
    /// Boolean `[B, 1, T, S]` mask, true where a query may attend to a key.
    Explicit(Tensor),
}

impl AttnMask {
    fn shallow_clone(&self) -> Self {
        match self {
            AttnMask::Causal => AttnMask::Causal,
            AttnMask::Explicit(m) => AttnMask::Explicit(m.shallow_clone()),
        }
    }
}

impl Attention {
    fn new(p: nn::Path, c: &ModelConfig) -> Self {
        let (h, q, kv) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        Attention {
            q_proj: Linear::new(&p / "q_proj", h, q, c.qkv_bias),
            k_proj: Linear::new(&p / "k_proj", h, kv, c.qkv_bias),
            v_proj: Linear::new(&p / "v_proj", h, kv, c.qkv_bias),
            o_proj: Linear::new(&p / "o_proj", q, h, c.o_bias),
            q_norm: c.qk_norm.then(|| RmsNorm::new(&p / "q_norm", c.head_dim, c.rms_norm_eps)),
            k_norm: c.qk_norm.then(|| RmsNorm::new(&p / "k_norm", c.head_dim, c.rms_norm_eps)),
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        }
    }

    fn shallow_clone(&self) -> Self {
        Attention {
            q_proj: self.q_proj.shallow_clone(),
            k_proj: self.k_proj.shallow_clone(),
            v_proj: self.v_proj.shallow_clone(),
            o_proj: self.o_proj.shallow_clone(),
            q_norm: self.q_norm.as_ref().map(RmsNorm::shallow_clone),
            k_norm: self.k_norm.as_ref().map(RmsNorm::shallow_clone),
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }

    fn heads(&self, proj: &Linear, norm: Option<&RmsNorm>, x: &Tensor, n: i64) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let y = proj.forward(x)?.f_view([b, t, n, self.head_dim])?;
        let y = match norm {
            Some(norm) => norm.forward(&y)?,
            None => y,
        };
        Ok(y.f_transpose(1, 2)?)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &AttnMask,
        cache: Option<(&mut (Tensor, Tensor), i64)>,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let q = rope.apply(&self.heads(&self.q_proj, self.q_norm.as_ref(), x, self.num_heads)?)?;
        let k = rope.apply(&self.heads(&self.k_proj, self.k_norm.as_ref(), x, self.num_kv_heads)?)?;
        let v = self.heads(&self.v_proj, None, x, self.num_kv_heads)?;
        let (k, v) = match cache {
            Some(((ck, cv), past)) => {
                ck.f_narrow(2, past, t)?.f_copy_(&k)?;
                cv.f_narrow(2, past, t)?.f_copy_(&v)?;
                (ck.f_narrow(2, 0, past + t)?, cv.f_narrow(2, 0, past + t)?)
            }
            // prefix tuning without a cache: the prefix's keys and values come first, as
            // transformers reads them from the cache PEFT builds (no RoPE on them)
            None => match prefix {
                Some((pk, pv)) => (Tensor::f_cat(&[pk, &k], 2)?, Tensor::f_cat(&[pv, &v], 2)?),
                None => (k, v),
            },
        };
        // grouped-query heads are matched inside the attention kernel (no copy of K/V)
        let gqa = self.num_heads != self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = match mask {
            AttnMask::Causal => {
                Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, scale, gqa)?
            }
            AttnMask::Explicit(m) => {
                Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, gqa)?
            }
        };
        let out = out.f_transpose(1, 2)?.f_reshape([b, t, self.num_heads * self.head_dim])?;
        self.o_proj.forward(&out)
    }
}

/// The gated SiLU feed-forward block.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn new(p: nn::Path, c: &ModelConfig) -> Self {
        Mlp {
            gate_proj: Linear::new(&p / "gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias),
            up_proj: Linear::new(&p / "up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias),
            down_proj: Linear::new(&p / "down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias),
        }
    }

    fn shallow_clone(&self) -> Self {
        Mlp {
            gate_proj: self.gate_proj.shallow_clone(),
            up_proj: self.up_proj.shallow_clone(),
            down_proj: self.down_proj.shallow_clone(),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = self.gate_proj.forward(x)?.f_silu()?.f_mul(&self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// `h + attn(norm(h))`, then `+ mlp(norm(·))`.
    fn forward(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        mask: &AttnMask,
        cache: Option<(&mut (Tensor, Tensor), i64)>,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(h)?;
        let h = h.f_add(&self.self_attn.forward(&normed, rope, mask, cache, prefix)?)?;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?;
        Ok(h.f_add(&m)?)
    }

    /// The same layer over the same parameters (what a deferred recomputation holds).
    fn shallow_clone(&self) -> Self {
        DecoderLayer {
            self_attn: self.self_attn.shallow_clone(),
            mlp: self.mlp.shallow_clone(),
            input_layernorm: self.input_layernorm.shallow_clone(),
            post_attention_layernorm: self.post_attention_layernorm.shallow_clone(),
        }
    }

    fn has_trainable_parameters(&self) -> bool {
        let norms = [
            Some(&self.input_layernorm),
            Some(&self.post_attention_layernorm),
            self.self_attn.q_norm.as_ref(),
            self.self_attn.k_norm.as_ref(),
        ];
        norms.into_iter().flatten().any(|n| n.weight.requires_grad())
            || self.linears().iter().any(|l| {
                l.weight.dense().is_some_and(Tensor::requires_grad)
                    || l.bias.as_ref().is_some_and(Tensor::requires_grad)
                    || l.lora.as_ref().is_some_and(|a| {
                        a.lora_a.requires_grad()
                            || a.lora_b.requires_grad()
                            || a.magnitude.as_ref().is_some_and(Tensor::requires_grad)
                    })
                    || l.ia3.as_ref().is_some_and(|v| v.vector.requires_grad())
            })
    }

    fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    /// Runs the layer without keeping a graph and defers its backward pass: only the input is
    /// kept; the backward recomputes the layer from it (from the same random seed) and
    /// back-propagates the output's gradient.
    fn forward_checkpointed(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        mask: &AttnMask,
        seed: Option<i64>,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let out = tch::no_grad(|| self.forward(h, rope, mask, None, prefix))?;
        let prefix_trains = prefix.is_some_and(|(k, v)| k.requires_grad() || v.requires_grad());
        if !(h.requires_grad() || prefix_trains || self.has_trainable_parameters()) {
            return Ok(out); // nothing to differentiate: an ordinary pass keeps no graph either
        }
        let out = out.set_requires_grad(true);
        let (layer, input, rope, mask) =
            (self.shallow_clone(), h.shallow_clone(), rope.shallow_clone(), mask.shallow_clone());
        // the recomputation back-propagates into the prefix's graph, which the loss's backward
        // pass keeps (`recompute::backward`)
        let prefix = prefix.map(|(k, v)| (k.shallow_clone(), v.shallow_clone()));
        recompute::defer(vec![out.shallow_clone()], move |grads| {
            if let Some(seed) = seed {
                tch::manual_seed(seed);
            }
            let again = layer.forward(&input, &rope, &mask, None, prefix.as_ref())?;
            recompute::backprop(&[again], &grads)
        });
        Ok(out)
    }
}

/// The decoder trunk (`model.*` in HF checkpoints): embeddings, layers, final norm. Its
/// projections are what LoRA adapts, so it also holds the adapters' run-time switches and
/// configuration, whatever head sits on it.
#[derive(Debug)]
pub struct Trunk {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    inv_freq: Tensor,
    /// The trunk's path in the `VarStore` (`model`), the prefix of its parameter names.
    prefix: String,
    mode: Arc<RunMode>,
    lora: Option<LoraConfig>,
    /// Prompt or prefix tuning's virtual tokens and their configuration, when attached
    /// (`peft::prompt`).
    virtual_tokens: Option<VirtualTokens>,
    prompt_learning: Option<PromptLearningConfig>,
    /// The attached (IA)³ configuration (its vectors live on the projections).
    ia3: Option<Ia3Config>,
    /// How the projections' weights are held, when quantised (`quantize`).
    quantization: Option<Quantization>,
}

/// The inputs of one forward pass besides the token ids.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// `[B, past + T]` with 1 for real tokens and 0 for padding (any side). None: no padding.
    pub attention_mask: Option<&'a Tensor>,
    /// `[B, T]` RoPE positions. None: derived from `attention_mask` (or `past..past+T`).
    pub position_ids: Option<&'a Tensor>,
    /// `[B, T]` segment of each token when several sequences are packed into one row: a token
    /// attends only to earlier tokens of its own segment (no cache). Pass restarting
    /// `position_ids` with it.
    pub segment_ids: Option<&'a Tensor>,
}

impl Trunk {
    pub fn new(p: nn::Path, c: &ModelConfig) -> Self {
        let embed_tokens = (&p / "embed_tokens").zeros("weight", &[c.vocab_size, c.hidden_size]);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let lp = &p / "layers" / i;
                DecoderLayer {
                    self_attn: Attention::new(&lp / "self_attn", c),
                    mlp: Mlp::new(&lp / "mlp", c),
                    input_layernorm: RmsNorm::new(&lp / "input_layernorm", c.hidden_size, c.rms_norm_eps),
                    post_attention_layernorm: RmsNorm::new(
                        &lp / "post_attention_layernorm",
                        c.hidden_size,
                        c.rms_norm_eps,
                    ),
                }
            })
            .collect();
        let norm = RmsNorm::new(&p / "norm", c.hidden_size, c.rms_norm_eps);
        let freqs: Vec<f32> =
            rope_inv_freq(c.rope_theta, c.head_dim, &c.rope_scaling).into_iter().map(|f| f as f32).collect();
        let inv_freq = Tensor::from_slice(&freqs).to_device(p.device());
        let prefix = p.components().collect::<Vec<_>>().join(".");
        Trunk {
            embed_tokens,
            layers,
            norm,
            inv_freq,
            prefix,
            mode: Arc::new(RunMode::new()),
            lora: None,
            virtual_tokens: None,
            prompt_learning: None,
            ia3: None,
            quantization: None,
        }
    }

    /// The trunk's path in the `VarStore` (`model`): its parameter names start with it and a dot.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Training mode turns on LoRA dropout; a new model starts in evaluation mode.
    pub fn set_training(&self, training: bool) {
        self.mode.training.store(training, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.mode.training()
    }

    /// Activation checkpointing (`[train] gradient_checkpointing`): with `every = k ≥ 1`, every
    /// k-th decoder layer (0, k, 2k, …) keeps only its input in a training forward pass and is
    /// recomputed in the backward pass (`recompute::backward`); 0 turns it off. Forward passes
    /// without gradients or with a KV cache are never checkpointed.
    pub fn set_gradient_checkpointing(&self, every: usize) {
        self.mode.checkpoint_every.store(every, Ordering::Relaxed);
    }

    pub fn gradient_checkpointing(&self) -> usize {
        self.mode.checkpoint_every.load(Ordering::Relaxed)
    }

    /// With adapters disabled the forward pass is the base model's. See `lora::without_adapters`.
    pub fn set_adapters_enabled(&self, enabled: bool) {
        self.mode.adapters_enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn adapters_enabled(&self) -> bool {
        self.mode.adapters_enabled()
    }

    /// The LoRA configuration of the attached adapters, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// How the projections' weights are held, when the trunk was quantised.
    pub fn quantization(&self) -> Option<Quantization> {
        self.quantization
    }

    /// Quantises the weight of every projection of the decoder layers (`linears`: q, k, v, o,
    /// gate, up, down; not the embeddings, norms or heads, as transformers' bitsandbytes
    /// integration leaves them) and removes the dense weights from `vs`, which frees them. Their
    /// biases stay dense and, like every quantised weight, frozen. Quantise after loading the
    /// weights and before attaching adapters.
    pub fn quantize(&mut self, vs: &nn::VarStore, q: Quantization) -> Result<()> {
        ensure!(self.lora.is_none(), "quantise the base model before attaching LoRA adapters");
        ensure!(self.quantization.is_none(), "the model is already quantised");
        tch::no_grad(|| -> Result<()> {
            for (path, lin) in self.linears_mut() {
                let LinearWeight::Dense(w) = &lin.weight else {
                    anyhow::bail!("{path}.weight is already quantised");
                };
                let quantized = QuantizedWeight::new(w, q).map_err(|e| anyhow::anyhow!("{path}.weight: {e}"))?;
                lin.weight = LinearWeight::Quantized(quantized);
                if let Some(b) = &lin.bias {
                    let _ = b.shallow_clone().f_requires_grad_(false)?;
                }
                remove_variables(vs, &[format!("{path}.weight")])?;
            }
            Ok(())
        })?;
        self.quantization = Some(q);
        Ok(())
    }

    /// Bytes of the quantised states of the projections (0 when not quantised); the rest of the
    /// model's bytes are its `VarStore`'s.
    pub fn quantized_bytes(&self) -> i64 {
        self.linears()
            .iter()
            .map(|(_, l)| match &l.weight {
                LinearWeight::Quantized(q) => q.nbytes(),
                LinearWeight::Dense(_) => 0,
            })
            .sum()
    }

    pub(crate) fn run_mode(&self) -> Arc<RunMode> {
        self.mode.clone()
    }

    /// Routes the batch rows of the following forward passes through the adapters of a served
    /// bank: `rows[i]` is the adapter number of row `i` (None: the base alone). Passing None
    /// clears the routing (every row the base).
    pub fn set_adapter_rows(&self, rows: Option<&[Option<usize>]>) -> Result<()> {
        let routing = match rows {
            None => None,
            Some(rows) => {
                let device = self.embed_tokens.device();
                let mut groups: std::collections::BTreeMap<usize, Vec<i64>> = Default::default();
                for (i, a) in rows.iter().enumerate() {
                    if let Some(a) = a {
                        groups.entry(*a).or_default().push(i as i64);
                    }
                }
                let mut out = Vec::with_capacity(groups.len());
                for (a, idx) in groups {
                    out.push((a, Tensor::from_slice(&idx).f_to_device(device)?));
                }
                Some(out)
            }
        };
        *self.mode.adapter_rows.lock().unwrap_or_else(|e| e.into_inner()) = routing;
        Ok(())
    }

    /// Number of adapters in the served bank (0 without one).
    pub fn bank_size(&self) -> usize {
        self.linears().iter().map(|(_, l)| l.bank.len()).max().unwrap_or(0)
    }

    pub(crate) fn set_lora_config(&mut self, config: Option<LoraConfig>) {
        self.lora = config;
    }

    /// The attached virtual tokens of prompt or prefix tuning, if any (enabled or not).
    pub fn virtual_tokens(&self) -> Option<&VirtualTokens> {
        self.virtual_tokens.as_ref()
    }

    /// The attached (IA)³ configuration, if any.
    pub fn ia3_config(&self) -> Option<&Ia3Config> {
        self.ia3.as_ref()
    }

    pub(crate) fn set_ia3_config(&mut self, config: Option<Ia3Config>) {
        self.ia3 = config;
    }

    /// Query heads, key/value heads and head width of the attention layers (None without layers).
    pub fn attention_heads(&self) -> Option<(i64, i64, i64)> {
        self.layers.first().map(|l| (l.self_attn.num_heads, l.self_attn.num_kv_heads, l.self_attn.head_dim))
    }

    /// The configuration of the attached prompt or prefix tuning, if any.
    pub fn prompt_learning_config(&self) -> Option<&PromptLearningConfig> {
        self.prompt_learning.as_ref()
    }

    pub(crate) fn set_virtual_tokens(&mut self, tokens: Option<(VirtualTokens, PromptLearningConfig)>) {
        (self.virtual_tokens, self.prompt_learning) = match tokens {
            Some((t, c)) => (Some(t), Some(c)),
            None => (None, None),
        };
    }

    /// The virtual tokens that take part in a forward pass now (none with adapters disabled).
    fn active_virtual_tokens(&self) -> Option<&VirtualTokens> {
        self.virtual_tokens.as_ref().filter(|_| self.adapters_enabled())
    }

    /// The projections of the decoder layers by HF module path (`model.layers.0.self_attn.q_proj`),
    /// layer by layer in the order q, k, v, o, gate, up, down. Heads are not among them.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("{}.layers.{i}.{name}", self.prefix), lin));
            }
        }
        out
    }

    /// `linears`, mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("{}.layers.{i}.{name}", self.prefix), lin));
            }
        }
        out
    }

    fn rope(&self, position_ids: &Tensor, kind: Kind) -> Result<RopeTables> {
        let freqs = position_ids.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&self.inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        Ok(RopeTables { cos: emb.f_cos()?.f_to_kind(kind)?, sin: emb.f_sin()?.f_to_kind(kind)? })
    }

    /// Hidden states after the final norm for every position, `[B, T, hidden]`.
    ///
    /// With prompt or prefix tuning attached and adapters enabled, `nv` virtual tokens come
    /// before every row, as PEFT's `PeftModelForCausalLM` puts them: prompt tuning prepends its
    /// embeddings (their positions are stripped from the result), prefix tuning gives every
    /// layer `nv` extra keys and values (no RoPE on them). Real tokens' positions start at `nv`
    /// (`position_ids` given are shifted by `nv`); `attention_mask` (in real tokens) gets `nv`
    /// leading ones; packed segments all see the virtual tokens. A KV cache takes the virtual
    /// positions in front of the real ones on its first pass (its `len` and `capacity` stay in
    /// real tokens).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        opts: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        ensure!(size.len() == 2, "input_ids must be [batch, seq], got {size:?}");
        let (b, t) = (size[0], size[1]);
        let device = input_ids.device();
        let kind = self.embed_tokens.kind();
        let vt = self.active_virtual_tokens();
        let nv = vt.map_or(0, VirtualTokens::num_virtual_tokens);
        let is_prefix = vt.is_some_and(VirtualTokens::is_prefix);
        // the prefix's keys and values are needed without a cache and to fill an empty one
        let need_prefix = is_prefix && cache.as_ref().map_or(true, |c| c.offset == 0 && c.len == 0);
        let prefix_kv = match (vt, self.layers.first()) {
            (Some(v), Some(l)) if need_prefix => {
                let (heads, dim) = (l.self_attn.num_kv_heads, l.self_attn.head_dim);
                // under checkpointing a training projection's table is a leaf whose gradient,
                // summed over the layers' recomputations, goes through the MLP once afterwards
                // (as an ordinary backward pass sums it), so both give the same gradients
                let every = self.gradient_checkpointing();
                let table = if every > 0 && cache.is_none() && recompute::grad_enabled() && v.projection_trains() {
                    let table = v.prefix_table()?.ok_or_else(|| anyhow!("no prefix table"))?;
                    let leaf = table.f_detach()?.set_requires_grad(true);
                    recompute::defer(vec![leaf.shallow_clone()], move |grads| recompute::backprop(&[table], &grads));
                    Some(leaf)
                } else {
                    None
                };
                v.prefix_key_values(table.as_ref(), b, self.layers.len() as i64, heads, dim, kind)?
            }
            _ => None,
        };
        // the cache takes the virtual positions on its first pass
        if let Some(c) = cache.as_deref_mut() {
            if nv > 0 && c.offset == 0 && c.len == 0 {
                c.reserve_virtual(nv)?;
                if let Some(kv) = &prefix_kv {
                    for ((ck, cv), (pk, pv)) in c.layers.iter_mut().zip(kv) {
                        ensure!(ck.size()[0] == b, "KV cache is for {} rows, input_ids has {b}", ck.size()[0]);
                        ck.f_narrow(2, 0, nv)?.f_copy_(pk)?;
                        cv.f_narrow(2, 0, nv)?.f_copy_(pv)?;
                    }
                    c.len = nv;
                }
            }
            ensure!(
                c.offset == nv,
                "KV cache holds {} virtual positions but the model now has {nv} (adapters enabled or disabled while the cache was in use)",
                c.offset
            );
        }
        let past = cache.as_ref().map_or(0, |c| c.len()); // real tokens already stored
        if let Some(c) = cache.as_ref() {
            ensure!(past + t <= c.capacity(), "KV cache holds {} positions, {} needed", c.capacity(), past + t);
        }
        if let Some(m) = opts.attention_mask {
            ensure!(m.size() == [b, past + t], "attention_mask must be [{b}, {}], got {:?}", past + t, m.size());
        }
        // prompt tuning runs its virtual tokens through the layers with the first pass
        let prepend = vt.is_some() && !is_prefix && cache.as_ref().map_or(true, |c| c.len == 0);
        let q_len = if prepend { nv + t } else { t };
        // key positions before the queries: the cache's (virtual ones included), or the prefix
        let kv_past = match cache.as_ref() {
            Some(c) => c.len,
            None if is_prefix => nv,
            None => 0,
        };
        let mask_full = match opts.attention_mask {
            Some(m) if nv > 0 => {
                let ones = Tensor::f_ones([b, nv], (m.kind(), device))?;
                Some(Tensor::f_cat(&[&ones, m], 1)?)
            }
            Some(m) => Some(m.shallow_clone()),
            None => None,
        };
        let position_ids = match (opts.position_ids, mask_full.as_ref()) {
            (Some(p), _) => {
                let real = if nv > 0 { p.f_add_scalar(nv)? } else { p.shallow_clone() };
                if prepend {
                    let virt = Tensor::f_arange(nv, (real.kind(), device))?.f_unsqueeze(0)?.f_expand([b, nv], false)?;
                    Tensor::f_cat(&[&virt, &real], 1)?
                } else {
                    real
                }
            }
            (None, Some(m)) => positions_from_mask(m)?.f_narrow(1, kv_past, q_len)?,
            (None, None) => Tensor::f_arange_start(kv_past, kv_past + q_len, (Kind::Int64, device))?
                .f_unsqueeze(0)?
                .f_expand([b, q_len], false)?,
        };
        let rope = self.rope(&position_ids, kind)?;
        let mask = match (opts.segment_ids, mask_full.as_ref()) {
            (Some(seg), _) => {
                ensure!(past == 0 && seg.size() == [b, t], "segment_ids must be [{b}, {t}] and used without a cache");
                // the virtual tokens are visible to every segment (as if each sequence had them)
                let seg_q = if prepend {
                    Tensor::f_cat(&[&Tensor::f_zeros([b, nv], (seg.kind(), device))?, seg], 1)?
                } else {
                    seg.shallow_clone()
                };
                let seg_k = if is_prefix {
                    Tensor::f_cat(&[&Tensor::f_zeros([b, nv], (seg.kind(), device))?, seg], 1)?
                } else {
                    seg_q.shallow_clone()
                };
                let same = seg_q.f_unsqueeze(2)?.f_eq_tensor(&seg_k.f_unsqueeze(1)?)?.f_unsqueeze(1)?;
                let virtual_key = Tensor::f_arange(kv_past + q_len, (Kind::Int64, device))?.f_lt(nv)?.f_view([
                    1,
                    1,
                    1,
                    kv_past + q_len,
                ])?;
                let causal = attention_bias_mask(None, b, kv_past, q_len, device)?;
                AttnMask::Explicit(causal.f_logical_and(&same.f_logical_or(&virtual_key)?)?)
            }
            (None, None) if kv_past == 0 => AttnMask::Causal,
            (None, m) => AttnMask::Explicit(attention_bias_mask(m, b, kv_past, q_len, device)?),
        };
        let every = self.gradient_checkpointing();
        let checkpointed = every > 0 && cache.is_none() && recompute::grad_enabled();
        let mut h = Tensor::f_embedding(&self.embed_tokens, input_ids, -1, false, false)?;
        if prepend {
            if let Some(e) = vt.map(|v| v.prompt_embeddings(b, kind)).transpose()?.flatten() {
                h = Tensor::f_cat(&[&e, &h], 1)?;
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            // a layer that draws random numbers runs from its own seed, checkpointed or not, so
            // that its recomputation draws the same ones
            let seed =
                if layer.linears().iter().any(|l| l.draws_random()) { Some(recompute::fork_rng()?) } else { None };
            let prefix = prefix_kv.as_ref().filter(|_| cache.is_none()).map(|kv| &kv[i]);
            h = if checkpointed && i % every == 0 {
                layer.forward_checkpointed(&h, &rope, &mask, seed, prefix)?
            } else {
                let kv = cache.as_deref_mut().map(|c| (&mut c.layers[i], kv_past));
                layer.forward(&h, &rope, &mask, kv, prefix)?
            };
        }
        if let Some(c) = cache {
            c.len += q_len;
        }
        let h = if prepend { h.f_narrow(1, nv, t)? } else { h };
        self.norm.forward(&h)
    }
}

/// RoPE positions for padded rows: the count of real tokens before each position
/// (`cumsum(mask) - 1`, clamped at 0), as HF's `generate` computes them.
pub fn positions_from_mask(mask: &Tensor) -> Result<Tensor> {
    Ok(mask.f_to_kind(Kind::Int64)?.f_cumsum(1, Kind::Int64)?.f_sub_scalar(1)?.f_clamp_min(0)?)
}

/// Boolean `[B, 1, T, past+T]` mask: causal, minus padded keys; every query may see itself so
/// rows of padding never become all-masked (their outputs are ignored).
fn attention_bias_mask(mask: Option<&Tensor>, b: i64, past: i64, t: i64, device: Device) -> Result<Tensor> {
    let s = past + t;
    let q = Tensor::f_arange_start(past, s, (Kind::Int64, device))?.f_view([t, 1])?;
    let k = Tensor::f_arange(s, (Kind::Int64, device))?.f_view([1, s])?;
    let causal = k.f_le_tensor(&q)?;
    let diag = k.f_eq_tensor(&q)?;
    let allowed = match mask {
        Some(m) => {
            let keys = m.f_to_kind(Kind::Bool)?.f_view([b, 1, 1, s])?;
            keys.f_logical_and(&causal.f_view([1, 1, t, s])?)?.f_logical_or(&diag.f_view([1, 1, t, s])?)?
        }
        None => causal.f_view([1, 1, t, s])?.f_expand([b, 1, t, s], false)?,
    };
    Ok(allowed)
}

/// A decoder with its language-model head (`lm_head.weight`, or the embeddings when tied).
#[derive(Debug)]
pub struct CausalLm {
    pub config: ModelConfig,
    pub model: Trunk,
    lm_head: Tensor,
}

impl CausalLm {
    /// Creates the parameters (zero-filled; norms at one) under their HF names in `root`.
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Self {
        let model = Trunk::new(root / "model", config);
        let lm_head = if config.tie_word_embeddings {
            model.embed_tokens.shallow_clone()
        } else {
            (root / "lm_head").zeros("weight", &[config.vocab_size, config.hidden_size])
        };
        CausalLm { config: config.clone(), model, lm_head }
    }

    /// The LM head's weight (`lm_head.weight`, or the embeddings when tied), `[vocab, hidden]`.
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Projects hidden states to vocabulary logits (in the model's dtype).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.f_linear::<Tensor>(&self.lm_head, None)?)
    }

    /// Logits for every position, `[B, T, vocab]`.
    pub fn forward(&self, input_ids: &Tensor, opts: &ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.model.forward(input_ids, opts, cache)?;
        self.lm_logits(&hidden)
    }

    pub fn kind(&self) -> Kind {
        self.model.embed_tokens.kind()
    }

    pub fn device(&self) -> Device {
        self.model.embed_tokens.device()
    }

    /// Training mode turns on LoRA dropout; a new model starts in evaluation mode.
    pub fn set_training(&self, training: bool) {
        self.model.set_training(training);
    }

    pub fn is_training(&self) -> bool {
        self.model.is_training()
    }

    /// With adapters disabled the forward pass is the base model's (e.g. the DPO/PPO reference).
    /// See also `lora::without_adapters`.
    pub fn set_adapters_enabled(&self, enabled: bool) {
        self.model.set_adapters_enabled(enabled);
    }

    pub fn adapters_enabled(&self) -> bool {
        self.model.adapters_enabled()
    }

    /// The LoRA configuration of the attached adapters, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.model.lora_config()
    }

    /// The projections of the decoder layers by HF module path (`model.layers.0.self_attn.q_proj`),
    /// layer by layer in the order q, k, v, o, gate, up, down. The LM head is not among them.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        self.model.linears()
    }

    /// `linears`, mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.model.linears_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_inv_freq_keeps_high_and_scales_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let base = rope_inv_freq(500000.0, 128, &RopeScaling::Default);
        let scaled = rope_inv_freq(500000.0, 128, &s);
        assert_eq!(base[0], scaled[0]); // wavelength 2π < 2048: unchanged
        let last = base.len() - 1; // longest wavelength: divided by the factor
        assert!((scaled[last] - base[last] / 8.0).abs() < 1e-15);
        // medium band lies between the two
        for (b, s) in base.iter().zip(&scaled) {
            assert!(*s <= *b + 1e-18 && *s >= b / 8.0 - 1e-18);
        }
        assert!((base[1] - 1.0 / 500000f64.powf(2.0 / 128.0)).abs() < 1e-15);
    }

    #[test]
    fn mask_is_causal_without_padding_and_hides_left_pads() {
        let m = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1]).view([2, 3]);
        let a = attention_bias_mask(Some(&m), 2, 0, 3, Device::Cpu).unwrap();
        let row0: Vec<bool> = Vec::try_from(a.get(0).get(0).flatten(0, -1)).unwrap();
        // query 0 is padding: sees only itself; queries 1,2 never see key 0
        assert_eq!(row0, vec![true, false, false, false, true, false, false, true, true]);
        let row1: Vec<bool> = Vec::try_from(a.get(1).get(0).flatten(0, -1)).unwrap();
        assert_eq!(row1, vec![true, false, false, true, true, false, true, true, true]);
        let pos = positions_from_mask(&m).unwrap();
        assert_eq!(Vec::<i64>::try_from(pos.flatten(0, -1)).unwrap(), vec![0, 0, 1, 0, 1, 2]);
    }
}
