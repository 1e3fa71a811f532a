//! AdamW with saveable state (f32 moments, or bitsandbytes-style 8-bit block-wise moments; f32
//! master weights for bf16/f16 parameters), learning-rate schedules as pure functions of the
//! step, and global-norm gradient clipping. Under data parallelism ([`AdamW::shard`]) the
//! gradients are reduced over the ranks here, and with ZeRO-1/2 each rank keeps the moments and
//! master weights of its share of the parameters only.
use std::collections::BTreeMap;

use align_dist::{ProcessGroup, ReduceOp};
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::blockwise::{block_count, dequantize_blockwise, quantize_blockwise, QuantMap};

/// `[train] optimizer`: how AdamW keeps its moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// f32 moments (8 bytes of state per trained parameter).
    #[default]
    Adamw,
    /// bitsandbytes' `AdamW8bit`: moments as 8-bit codes with an f32 absmax per block of
    /// [`BLOCK_SIZE`] (about 2 bytes per parameter); tensors under [`MIN_8BIT_SIZE`] elements
    /// keep f32 moments.
    Adamw8bit,
}

impl OptimizerKind {
    /// The values `[train] optimizer` accepts.
    pub const ACCEPTED: [&'static str; 2] = ["adamw", "adamw8bit"];

    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Adamw8bit => "adamw8bit",
        }
    }

    /// Parses a value of `[train] optimizer` (or `align plan --optimizer`); the error names the
    /// key and the accepted values.
    pub fn parse(value: &str) -> Result<OptimizerKind> {
        match value {
            "adamw" => Ok(OptimizerKind::Adamw),
            "adamw8bit" => Ok(OptimizerKind::Adamw8bit),
            other => bail!(
                "key 'train.optimizer': unknown optimizer \"{other}\" (expected one of {})",
                OptimizerKind::ACCEPTED.map(|a| format!("\"{a}\"")).join(", ")
            ),
        }
    }
}

impl<'de> Deserialize<'de> for OptimizerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        OptimizerKind::parse(&value).map_err(|e| serde::de::Error::custom(e.to_string()))
    }
}

/// Elements per block of an 8-bit moment (bitsandbytes' block-wise optimizers use 256).
pub const BLOCK_SIZE: i64 = 256;
/// Tensors with fewer elements keep f32 moments under `adamw8bit` (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: i64 = 4096;

/// Learning-rate schedule shapes after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// The learning rate at optimizer step `step` (0-based) of `total_steps`: linear warmup from 0 to
/// `peak` over `warmup_steps`, then constant, linear or cosine decay to `min_lr_ratio · peak`.
pub fn learning_rate(
    step: u64,
    total_steps: u64,
    peak: f64,
    warmup_steps: u64,
    schedule: Schedule,
    min_lr_ratio: f64,
) -> f64 {
    if warmup_steps > 0 && step < warmup_steps {
        return peak * (step + 1) as f64 / warmup_steps as f64;
    }
    let floor = peak * min_lr_ratio;
    let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
    let progress = ((step - warmup_steps.min(step)) as f64 / decay_steps as f64).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => floor + (peak - floor) * (1.0 - progress),
        Schedule::Cosine => floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// f32 or 8-bit block-wise moments.
    pub kind: OptimizerKind,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, kind: OptimizerKind::Adamw }
    }
}

/// A parameter's two moments.
enum Moments {
    /// Kept by another rank (ZeRO-1/2).
    None,
    /// f32, the parameter's shape.
    Full { exp_avg: Tensor, exp_avg_sq: Tensor },
    /// 8-bit codes (uint8, the parameter's shape) of the signed (`exp_avg`) and unsigned
    /// (`exp_avg_sq`) dynamic maps, with an f32 absmax per block of [`BLOCK_SIZE`].
    Blockwise { exp_avg: Tensor, exp_avg_absmax: Tensor, exp_avg_sq: Tensor, exp_avg_sq_absmax: Tensor },
}

struct ParamState {
    name: String,
    param: Tensor,
    /// f32 copy the update is applied to when the parameter itself is bf16/f16 (on its owner).
    master: Option<Tensor>,
    /// [`Moments::None`] on the ranks that do not own the parameter (ZeRO-1/2).
    moments: Moments,
    decay: bool,
    /// The rank that updates this parameter (0 when not sharded).
    owner: usize,
    /// The factor of the learning rate for this parameter (1; LoRA+ raises it for `lora_B`).
    lr_scale: f64,
}

/// How the optimizer's work is split over the ranks of a data-parallel job.
struct Sharding {
    group: &'static ProcessGroup,
    /// 0: every rank keeps all state; 1: moments and masters partitioned; 2: and gradients
    /// reduced to their owner only.
    zero: u8,
    /// Which parameters got a gradient on some rank, from the last [`AdamW::reduce_grads`]: the
    /// ones their owners update and send after the step.
    reduced: Option<Vec<bool>>,
}

/// The two dynamic maps of the 8-bit moments, on one device.
struct DeviceMaps {
    device: Device,
    signed: QuantMap,
    unsigned: QuantMap,
}

/// Decoupled-weight-decay Adam over named parameters (PyTorch's `AdamW` update rule; with
/// [`OptimizerKind::Adamw8bit`], bitsandbytes' `AdamW8bit` block-wise 8-bit update).
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// The dynamic maps for each device holding 8-bit moments.
    maps: Vec<DeviceMaps>,
    /// Updates applied so far (Adam's bias-correction step count).
    pub steps: u64,
    sharding: Option<Sharding>,
}

/// A parameter's state tensors by their checkpoint names (none where another rank keeps it).
fn param_state(p: &ParamState) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    match &p.moments {
        Moments::None => {}
        Moments::Full { exp_avg, exp_avg_sq } => {
            out.insert(format!("exp_avg.{}", p.name), exp_avg.shallow_clone());
            out.insert(format!("exp_avg_sq.{}", p.name), exp_avg_sq.shallow_clone());
        }
        Moments::Blockwise { exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax } => {
            out.insert(format!("exp_avg.{}", p.name), exp_avg.shallow_clone());
            out.insert(format!("exp_avg_absmax.{}", p.name), exp_avg_absmax.shallow_clone());
            out.insert(format!("exp_avg_sq.{}", p.name), exp_avg_sq.shallow_clone());
            out.insert(format!("exp_avg_sq_absmax.{}", p.name), exp_avg_sq_absmax.shallow_clone());
        }
    }
    if let Some(m) = &p.master {
        out.insert(format!("master.{}", p.name), m.shallow_clone());
    }
    out
}

/// The owner rank of each of parameters of `numels` elements: largest first, each to the rank
/// with the fewest elements so far (lowest rank on ties), as PyTorch's `ZeroRedundancyOptimizer`.
pub fn partition(numels: &[usize], ranks: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..numels.len()).collect();
    order.sort_by(|&a, &b| numels[b].cmp(&numels[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; ranks.max(1)];
    let mut owner = vec![0; numels.len()];
    for i in order {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).expect("at least one rank");
        owner[i] = r;
        load[r] += numels[i];
    }
    owner
}

/// Whether a parameter gets weight decay by default: not norms, not biases (1-D tensors).
pub fn decays_by_default(name: &str, t: &Tensor) -> bool {
    t.dim() >= 2 && !name.contains("norm")
}

impl AdamW {
    /// `params`: (HF name, parameter) pairs to train, in a fixed order.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self> {
        Self::build(params, cfg, None)
    }

    /// This rank's optimizer in a data-parallel job over `group`: gradients are summed over
    /// the ranks before the norm and the update ([`AdamW::reduce_grads`]). With `zero` 1 or 2,
    /// the parameters are partitioned over the ranks as PyTorch's `ZeroRedundancyOptimizer`
    /// does (largest first, each to the rank with the fewest elements so far); a rank allocates
    /// and keeps the moments and f32 masters of its own parameters only, updates them, and
    /// sends them to the others after each step. With 2, each gradient is reduced to its owner
    /// only and released on the other ranks.
    pub fn sharded(
        params: Vec<(String, Tensor)>,
        cfg: AdamWConfig,
        group: &'static ProcessGroup,
        zero: u8,
    ) -> Result<Self> {
        if zero > 2 {
            bail!("train.zero = {zero}: expected 0, 1 or 2");
        }
        let owners = if zero > 0 {
            partition(&params.iter().map(|(_, p)| p.numel()).collect::<Vec<_>>(), group.size())
        } else {
            vec![group.rank(); params.len()]
        };
        let mut opt = Self::build(params, cfg, Some((&owners, group.rank())))?;
        opt.sharding = Some(Sharding { group, zero, reduced: None });
        Ok(opt)
    }

    /// `owners`: each parameter's owner rank and this rank; state is allocated for its own only.
    fn build(params: Vec<(String, Tensor)>, cfg: AdamWConfig, owners: Option<(&[usize], usize)>) -> Result<Self> {
        let mut maps: Vec<DeviceMaps> = Vec::new();
        let params = params
            .into_iter()
            .enumerate()
            .map(|(i, (name, param))| {
                let owner = owners.map_or(0, |(o, _)| o[i]);
                if owners.is_some_and(|(_, rank)| owner != rank) {
                    let decay = decays_by_default(&name, &param);
                    return Ok(ParamState {
                        decay,
                        moments: Moments::None,
                        master: None,
                        name,
                        param,
                        owner,
                        lr_scale: 1.0,
                    });
                }
                let master =
                    if param.kind() == Kind::Float { None } else { Some(param.f_detach()?.f_to_kind(Kind::Float)?) };
                let moments = if is_8bit(cfg.kind, &param) {
                    let device = param.device();
                    if !maps.iter().any(|m| m.device == device) {
                        maps.push(DeviceMaps {
                            device,
                            signed: QuantMap::dynamic(true, device)?,
                            unsigned: QuantMap::dynamic(false, device)?,
                        });
                    }
                    // bitsandbytes starts from zero codes and zero absmax (moments of -0 / 0)
                    let codes = || Tensor::f_zeros(param.size(), (Kind::Uint8, device));
                    let absmax =
                        || Tensor::f_zeros([block_count(param.numel() as i64, BLOCK_SIZE)], (Kind::Float, device));
                    Moments::Blockwise {
                        exp_avg: codes()?,
                        exp_avg_absmax: absmax()?,
                        exp_avg_sq: codes()?,
                        exp_avg_sq_absmax: absmax()?,
                    }
                } else {
                    let zeros = || Tensor::f_zeros_like(&param)?.f_to_kind(Kind::Float);
                    Moments::Full { exp_avg: zeros()?, exp_avg_sq: zeros()? }
                };
                let decay = decays_by_default(&name, &param);
                Ok(ParamState { decay, moments, master, name, param, owner, lr_scale: 1.0 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, maps, steps: 0, sharding: None })
    }

    /// Sums the gradients over the ranks (a no-op in a world of one), in flattened buckets of
    /// [`align_dist::BUCKET_BYTES`]: to every rank (ZeRO-0/1) or to each parameter's owner
    /// (ZeRO-2, the others' copies released). A parameter with a gradient on some rank only gets
    /// a zero gradient on the others first, so every rank updates the same parameters.
    pub fn reduce_grads(&mut self) -> Result<()> {
        let Some(sh) = &mut self.sharding else { return Ok(()) };
        let g = sh.group;
        let mut defined: Vec<f64> = self.params.iter().map(|p| p.param.grad().defined() as u8 as f64).collect();
        g.all_reduce_f64(&mut defined, ReduceOp::Max)?;
        for (p, d) in self.params.iter().zip(&defined) {
            if *d > 0.0 && !p.param.grad().defined() {
                align_dist::set_grad(&p.param, &Tensor::f_zeros_like(&p.param)?)?;
            }
        }
        let with_grad: Vec<usize> = (0..self.params.len()).filter(|&i| defined[i] > 0.0).collect();
        sh.reduced = Some(defined.iter().map(|&d| d > 0.0).collect());
        let sh = &*sh;
        if sh.zero < 2 {
            let grads: Vec<Tensor> = with_grad.iter().map(|&i| self.params[i].param.grad()).collect();
            return align_dist::bucketed(&grads, align_dist::BUCKET_BYTES, |flat, _| g.all_reduce(flat, ReduceOp::Sum));
        }
        for owner in 0..g.size() {
            let mine: Vec<usize> = with_grad.iter().copied().filter(|&i| self.params[i].owner == owner).collect();
            let grads: Vec<Tensor> = mine.iter().map(|&i| self.params[i].param.grad()).collect();
            align_dist::bucketed(&grads, align_dist::BUCKET_BYTES, |flat, _| g.reduce(flat, owner, ReduceOp::Sum))?;
            if owner != g.rank() {
                for &i in &mine {
                    align_dist::release_grad(&self.params[i].param)?;
                }
            }
        }
        Ok(())
    }

    /// f32 or 8-bit moments.
    pub fn kind(&self) -> OptimizerKind {
        self.cfg.kind
    }

    pub fn parameters(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.param))
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.param.zero_grad();
        }
    }

    /// Global L2 norm of all gradients (f32), before any clipping. Under ZeRO-2, where each rank
    /// holds its own parameters' gradients only, the squares are gathered per parameter and
    /// summed in the same order, so the norm is the one a single process computes.
    pub fn grad_norm(&self) -> Result<f64> {
        let mut squares = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let g = p.param.grad();
            squares.push(if g.defined() {
                g.f_to_kind(Kind::Float)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?
            } else {
                0.0
            });
        }
        if let Some(sh) = self.sharding.as_ref().filter(|s| s.zero == 2) {
            // only the owner holds a gradient: a sum of one value and zeros is that value
            sh.group.all_reduce_f64(&mut squares, ReduceOp::Sum)?;
        }
        Ok(squares.iter().sum::<f64>().sqrt())
    }

    /// Scales all gradients by `factor` (used for clipping).
    pub fn scale_grads(&mut self, factor: f64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in &self.params {
                let mut g = p.param.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(factor)?;
                }
            }
            Ok(())
        })
    }

    /// Sets the factor of the learning rate of each parameter (`scale(name, parameter)`; 1 for
    /// all unless set): LoRA+ trains `lora_B` faster.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str, &Tensor) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name, &p.param);
        }
    }

    /// One AdamW update with learning rate `lr` (times each parameter's factor).
    pub fn step(&mut self, base_lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.cfg;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let bias2_sqrt = bias2.sqrt();
        let maps = &self.maps;
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() || matches!(p.moments, Moments::None) {
                    continue;
                }
                let lr = if p.lr_scale == 1.0 { base_lr } else { base_lr * p.lr_scale };
                let step_size = lr / bias1;
                let g = g.f_to_kind(Kind::Float)?;
                let mut target = match &p.master {
                    Some(m) => m.shallow_clone(),
                    None => p.param.shallow_clone(),
                };
                match &mut p.moments {
                    Moments::None => {}
                    Moments::Full { exp_avg, exp_avg_sq } => {
                        if p.decay && c.weight_decay != 0.0 {
                            let _ = target.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                        }
                        let _ = exp_avg.f_lerp_(&g, 1.0 - c.beta1)?;
                        let _ = exp_avg_sq.f_mul_scalar_(c.beta2)?.f_addcmul_(&g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
                        let denom = exp_avg_sq.f_sqrt()?.f_div_scalar(bias2_sqrt)?.f_add_scalar(c.eps)?;
                        let _ = target.f_addcdiv_(&exp_avg.f_mul_scalar(-step_size)?, &denom)?;
                    }
                    Moments::Blockwise { exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax } => {
                        let device = p.param.device();
                        let m = maps
                            .iter()
                            .find(|m| m.device == device)
                            .ok_or_else(|| anyhow!("parameter '{}': no 8-bit maps for {device:?}", p.name))?;
                        let moments = Blockwise8bitMoments {
                            exp_avg: (exp_avg, exp_avg_absmax),
                            exp_avg_sq: (exp_avg_sq, exp_avg_sq_absmax),
                        };
                        let decay = if p.decay { c.weight_decay } else { 0.0 };
                        adamw8bit_update(&mut target, &g, moments, &m.signed, &m.unsigned, &c, decay, lr, self.steps)
                            .map_err(|e| anyhow!("parameter '{}': {e}", p.name))?;
                    }
                }
                if p.master.is_some() {
                    let _ = p.param.f_copy_(&target)?;
                }
            }
            Ok(())
        })?;
        self.share_updates()
    }

    /// ZeRO-1/2: every owner sends its updated parameters to the other ranks (bucketed
    /// broadcasts), so all ranks hold the same weights again.
    fn share_updates(&mut self) -> Result<()> {
        let Some(sh) = self.sharding.as_mut() else { return Ok(()) };
        // an owner updated the parameters that got a gradient on some rank (agreed by
        // reduce_grads, which every step of a sharded optimizer follows)
        let reduced = sh.reduced.take().ok_or_else(|| anyhow!("a sharded AdamW stepped without reduce_grads"))?;
        if sh.zero == 0 {
            return Ok(());
        }
        let g = sh.group;
        for owner in 0..g.size() {
            let params: Vec<Tensor> = self
                .params
                .iter()
                .zip(&reduced)
                .filter(|(p, &r)| p.owner == owner && r)
                .map(|(p, _)| p.param.detach())
                .collect();
            align_dist::bucketed(&params, align_dist::BUCKET_BYTES, |flat, _| g.broadcast(flat, owner))?;
        }
        Ok(())
    }

    /// Optimizer state as named tensors: `exp_avg.NAME`, `exp_avg_sq.NAME` (f32, or the uint8
    /// codes of 8-bit moments, then with `exp_avg_absmax.NAME`, `exp_avg_sq_absmax.NAME`) and
    /// `master.NAME` for bf16/f16 parameters.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        self.params.iter().filter(|p| !matches!(p.moments, Moments::None)).flat_map(param_state).collect()
    }

    /// The whole optimizer state as [`AdamW::state_tensors`] gives it in one process: under
    /// ZeRO-1/2 each parameter's state is sent by its owner (one broadcast per tensor), so a
    /// checkpoint holds all of it and resumes in any number of ranks. Every rank must call it;
    /// rank 0, which writes checkpoints, gets the whole state (so it holds all of it while a
    /// checkpoint is written), the others an empty map.
    pub fn gathered_state(&self) -> Result<BTreeMap<String, Tensor>> {
        let Some(sh) = self.sharding.as_ref().filter(|s| s.zero > 0) else { return Ok(self.state_tensors()) };
        let g = sh.group;
        let mut out = BTreeMap::new();
        for p in &self.params {
            let own = if p.owner == g.rank() { param_state(p) } else { BTreeMap::new() };
            for (key, shape, kind) in self.state_layout(p) {
                let mut t = match own.get(&key) {
                    Some(t) => t.f_contiguous()?,
                    None => Tensor::f_empty(shape.as_slice(), (kind, p.param.device()))?,
                };
                g.broadcast(&mut t, p.owner)?;
                // rank 0 writes the checkpoint: only it keeps what it received
                if g.rank() == 0 {
                    out.insert(key, t);
                }
            }
        }
        Ok(out)
    }

    /// The names, shapes and dtypes of a parameter's state (known on every rank).
    fn state_layout(&self, p: &ParamState) -> Vec<(String, Vec<i64>, Kind)> {
        let shape = p.param.size();
        let n = &p.name;
        let mut out = if is_8bit(self.cfg.kind, &p.param) {
            let blocks = vec![block_count(p.param.numel() as i64, BLOCK_SIZE)];
            vec![
                (format!("exp_avg.{n}"), shape.clone(), Kind::Uint8),
                (format!("exp_avg_absmax.{n}"), blocks.clone(), Kind::Float),
                (format!("exp_avg_sq.{n}"), shape.clone(), Kind::Uint8),
                (format!("exp_avg_sq_absmax.{n}"), blocks, Kind::Float),
            ]
        } else {
            vec![
                (format!("exp_avg.{n}"), shape.clone(), Kind::Float),
                (format!("exp_avg_sq.{n}"), shape.clone(), Kind::Float),
            ]
        };
        if p.param.kind() != Kind::Float {
            out.push((format!("master.{n}"), shape, Kind::Float));
        }
        out
    }

    /// Bytes of optimizer state held (moments, absmax, master copies): what a checkpoint's
    /// `train_state/NAME.safetensors` stores, less its header.
    pub fn state_bytes(&self) -> usize {
        self.state_tensors().values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }

    /// Restores state written by `state_tensors` (and the step count). A state of the other
    /// optimizer kind (f32 moments for `adamw8bit`, codes for `adamw`) is refused, naming both.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        let kind = self.cfg.kind;
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let get = |key: String, want: &Tensor| -> Result<&Tensor> {
                    let src = tensors.get(&key).ok_or_else(|| anyhow!("optimizer state lacks '{key}'"))?;
                    if src.kind() != want.kind() {
                        bail!(
                            "optimizer state '{key}' is {:?}, expected {:?} for train.optimizer = \"{}\" \
                             (was the checkpoint written with another optimizer?)",
                            src.kind(),
                            want.kind(),
                            kind.as_str()
                        );
                    }
                    if src.size() != want.size() {
                        bail!("optimizer state '{key}' has shape {:?}, expected {:?}", src.size(), want.size());
                    }
                    Ok(src)
                };
                let name = &p.name;
                match &mut p.moments {
                    Moments::None => {}
                    Moments::Full { exp_avg, exp_avg_sq } => {
                        let _ = exp_avg.f_copy_(get(format!("exp_avg.{name}"), exp_avg)?)?;
                        let _ = exp_avg_sq.f_copy_(get(format!("exp_avg_sq.{name}"), exp_avg_sq)?)?;
                    }
                    Moments::Blockwise { exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax } => {
                        let _ = exp_avg.f_copy_(get(format!("exp_avg.{name}"), exp_avg)?)?;
                        let _ = exp_avg_absmax.f_copy_(get(format!("exp_avg_absmax.{name}"), exp_avg_absmax)?)?;
                        let _ = exp_avg_sq.f_copy_(get(format!("exp_avg_sq.{name}"), exp_avg_sq)?)?;
                        let _ =
                            exp_avg_sq_absmax.f_copy_(get(format!("exp_avg_sq_absmax.{name}"), exp_avg_sq_absmax)?)?;
                    }
                }
                if let Some(m) = &mut p.master {
                    let _ = m.f_copy_(get(format!("master.{name}"), m)?)?;
                    let _ = p.param.f_copy_(m)?;
                }
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }

    /// True when every parameter (and master copy) is finite (on every rank).
    pub fn all_finite(&self) -> Result<bool> {
        // an f16/bf16 parameter can overflow to inf while its f32 master is finite: check both
        let mut bad = [0.0];
        'params: for p in &self.params {
            for t in std::iter::once(&p.param).chain(p.master.as_ref()) {
                if t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
                    bad[0] = 1.0;
                    break 'params;
                }
            }
        }
        if let Some(sh) = &self.sharding {
            sh.group.all_reduce_f64(&mut bad, ReduceOp::Max)?;
        }
        Ok(bad[0] == 0.0)
    }
}

/// True when `param` gets 8-bit moments under `kind` (bitsandbytes: at least `min_8bit_size`
/// elements).
pub fn is_8bit(kind: OptimizerKind, param: &Tensor) -> bool {
    kind == OptimizerKind::Adamw8bit && param.numel() as i64 >= MIN_8BIT_SIZE
}

/// One parameter's 8-bit moments: (codes, absmax) of `exp_avg` and of `exp_avg_sq`.
pub struct Blockwise8bitMoments<'a> {
    pub exp_avg: (&'a mut Tensor, &'a mut Tensor),
    pub exp_avg_sq: (&'a mut Tensor, &'a mut Tensor),
}

/// bitsandbytes' block-wise 8-bit Adam update (`optimizer_update_8bit_blockwise`, CPU kernel,
/// `"adam"`), in its order and with its float32 operations: dequantise both moments; `m = β1·m +
/// (1-β1)·g`, `v = β2·v + (1-β2)·g²`; `denom = √v / √(1-β2^t) + ε`; decoupled decay `w ·= 1 -
/// lr·wd`; `w -= lr/(1-β1^t) · m / denom` from the updated f32 moments; then each moment
/// requantised with its new absmax per block. `target` is the f32 weight (or master copy), `g`
/// the f32 gradient, `step` the 1-based update count.
#[allow(clippy::too_many_arguments)]
pub fn adamw8bit_update(
    target: &mut Tensor,
    g: &Tensor,
    moments: Blockwise8bitMoments,
    signed: &QuantMap,
    unsigned: &QuantMap,
    cfg: &AdamWConfig,
    weight_decay: f64,
    lr: f64,
    step: u64,
) -> Result<()> {
    let (m_codes, m_absmax) = moments.exp_avg;
    let (v_codes, v_absmax) = moments.exp_avg_sq;
    let mut m = dequantize_blockwise(m_codes, m_absmax, signed, BLOCK_SIZE)?;
    let mut v = dequantize_blockwise(v_codes, v_absmax, unsigned, BLOCK_SIZE)?;
    // `m.mul_(β1).add_(g, alpha=1-β1)`: tch has no `alpha`; addcmul by a float32 scalar tensor
    // is the same fused float32 operation, bit for bit
    let one_minus_beta1 = Tensor::f_scalar_tensor(1.0 - cfg.beta1, (Kind::Float, g.device()))?;
    let _ = m.f_mul_scalar_(cfg.beta1)?.f_addcmul_(g, &one_minus_beta1)?;
    // `v.mul_(β2).addcmul_(g, g, value=1-β2)`: the kernel forms value·g first, as here
    let _ = v.f_mul_scalar_(cfg.beta2)?.f_addcmul_(&g.f_mul_scalar(1.0 - cfg.beta2)?, g)?;
    // Python's `beta ** step` is the C library's pow, as f64::powf
    let correction1 = 1.0 - cfg.beta1.powf(step as f64);
    let correction2 = (1.0 - cfg.beta2.powf(step as f64)).sqrt();
    let denom = v.f_sqrt()?.f_div_scalar(correction2)?.f_add_scalar(cfg.eps)?;
    if weight_decay > 0.0 {
        let _ = target.f_mul_scalar_(1.0 - lr * weight_decay)?;
    }
    // `addcdiv_(m, denom, value=s)` computes (s·m)/denom, as here
    let _ = target.f_addcdiv_(&m.f_mul_scalar(-lr / correction1)?, &denom)?;
    let (codes, absmax) = quantize_blockwise(&m, signed, BLOCK_SIZE)?;
    let _ = m_codes.f_copy_(&codes)?;
    let _ = m_absmax.f_copy_(&absmax)?;
    let (codes, absmax) = quantize_blockwise(&v, unsigned, BLOCK_SIZE)?;
    let _ = v_codes.f_copy_(&codes)?;
    let _ = v_absmax.f_copy_(&absmax)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn schedules_hit_their_end_points() {
        let lr = |s, sch| learning_rate(s, 100, 1.0, 10, sch, 0.1);
        assert!((lr(0, Schedule::Cosine) - 0.1).abs() < 1e-12); // warmup step 1 of 10
        assert!((lr(9, Schedule::Cosine) - 1.0).abs() < 1e-12);
        assert!((lr(10, Schedule::Cosine) - 1.0).abs() < 1e-12);
        assert!((lr(55, Schedule::Cosine) - (0.1 + 0.9 * 0.5)).abs() < 1e-12); // half-way
        assert!((lr(100, Schedule::Cosine) - 0.1).abs() < 1e-12);
        assert!((lr(55, Schedule::Linear) - 0.55).abs() < 1e-12);
        assert_eq!(lr(70, Schedule::Constant), 1.0);
    }

    #[test]
    fn partition_gives_the_largest_first_to_the_least_loaded_rank() {
        // sizes 10, 7, 5, 3, 3 over 2 ranks: 10→0, 7→1, 5→1 (7 < 10), 3→0 (10 < 12), 3→1 (12 < 13)
        assert_eq!(partition(&[3, 10, 5, 7, 3], 2), vec![0, 0, 1, 1, 1]);
        assert_eq!(partition(&[4, 4, 4], 1), vec![0, 0, 0]);
        let owners = partition(&[8, 8, 8, 8], 4);
        let mut sorted = owners.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        // one parameter w = [1, -2], grad = [0.5, 0.5], lr 0.1, wd 0.01 (decayed: 2-D)
        let w = Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]).set_requires_grad(true);
        let mut opt =
            AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig { weight_decay: 0.01, ..Default::default() })
                .unwrap();
        let loss = (&w * 0.5).sum(Kind::Float);
        loss.backward();
        opt.step(0.1).unwrap();
        // decoupled decay, then m̂ = g, v̂ = g², update = lr · g / (|g| + eps)
        let want = [1.0 * (1.0 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 * (1.0 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8)];
        let got: Vec<f32> = Vec::try_from(w.flatten(0, -1)).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn lr_scales_multiply_the_learning_rate_of_their_parameters() {
        // the same gradient on two parameters; the second's learning rate is 16 times the first's
        let a = Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]).set_requires_grad(true);
        let b = Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]).set_requires_grad(true);
        let params = vec![("m.lora_A.weight".into(), a.shallow_clone()), ("m.lora_B.weight".into(), b.shallow_clone())];
        let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
        opt.set_lr_scales(|name, _| if name.contains("lora_B") { 16.0 } else { 1.0 });
        ((&a * 0.5).sum(Kind::Float) + (&b * 0.5).sum(Kind::Float)).backward();
        opt.step(1e-3).unwrap();
        let moved = |t: &Tensor| (t - Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2])).abs().max().double_value(&[]);
        let ratio = moved(&b) / moved(&a);
        assert!((ratio - 16.0).abs() < 1e-3, "{ratio}");
    }

    #[test]
    fn bf16_parameters_update_through_f32_masters_and_state_round_trips() {
        let w = Tensor::ones([4, 4], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig::default()).unwrap();
        for _ in 0..3 {
            opt.zero_grad();
            (&w * 2.0).sum(Kind::Float).backward();
            opt.step(1e-4).unwrap();
        }
        let state = opt.state_tensors();
        assert!(state.contains_key("master.w"));
        // 3 tiny steps are lost in bf16 rounding of 1.0 but kept by the master copy
        assert!(state["master.w"].double_value(&[0, 0]) < 1.0);
        let w2 = Tensor::ones([4, 4], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
        let mut opt2 = AdamW::new(vec![("w".into(), w2.shallow_clone())], AdamWConfig::default()).unwrap();
        opt2.load_state(&state, 3).unwrap();
        assert!(opt2.state_tensors()["master.w"].equal(&state["master.w"]));
        assert!(opt.all_finite().unwrap());
    }

    #[test]
    fn an_f16_parameter_at_inf_is_not_finite_even_with_a_finite_master() {
        let w = Tensor::ones([2, 2], (Kind::Half, Device::Cpu)).set_requires_grad(true);
        let opt = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig::default()).unwrap();
        assert!(opt.all_finite().unwrap());
        tch::no_grad(|| {
            let _ = w.shallow_clone().fill_(f64::INFINITY);
        });
        assert!(opt.state_tensors()["master.w"].isfinite().all().int64_value(&[]) == 1, "the master stays finite");
        assert!(!opt.all_finite().unwrap(), "the f16 parameter itself is inf");
    }
}
