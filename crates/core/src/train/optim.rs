//! AdamW with saveable state (f32 moments; f32 master weights for bf16/f16 parameters), learning-
//! rate schedules as pure functions of the step, and global-norm gradient clipping.
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

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
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

struct ParamState {
    name: String,
    param: Tensor,
    /// f32 copy the update is applied to when the parameter itself is bf16/f16.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// Decoupled-weight-decay Adam over named parameters (PyTorch's `AdamW` update rule).
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// Updates applied so far (Adam's bias-correction step count).
    pub steps: u64,
}

/// Whether a parameter gets weight decay by default: not norms, not biases (1-D tensors).
pub fn decays_by_default(name: &str, t: &Tensor) -> bool {
    t.dim() >= 2 && !name.contains("norm")
}

impl AdamW {
    /// `params`: (HF name, parameter) pairs to train, in a fixed order.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, param)| {
                let master =
                    if param.kind() == Kind::Float { None } else { Some(param.f_detach()?.f_to_kind(Kind::Float)?) };
                let zeros = || Tensor::f_zeros_like(&param)?.f_to_kind(Kind::Float);
                Ok(ParamState {
                    decay: decays_by_default(&name, &param),
                    exp_avg: zeros()?,
                    exp_avg_sq: zeros()?,
                    master,
                    name,
                    param,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, steps: 0 })
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

    /// Global L2 norm of all gradients (f32), before any clipping.
    pub fn grad_norm(&self) -> Result<f64> {
        let mut total = 0f64;
        for p in &self.params {
            let g = p.param.grad();
            if g.defined() {
                total += g.f_to_kind(Kind::Float)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        Ok(total.sqrt())
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

    /// One AdamW update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.cfg;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bias1;
        let bias2_sqrt = bias2.sqrt();
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.f_to_kind(Kind::Float)?;
                let mut target = match &p.master {
                    Some(m) => m.shallow_clone(),
                    None => p.param.shallow_clone(),
                };
                if p.decay && c.weight_decay != 0.0 {
                    let _ = target.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let _ = p.exp_avg.f_lerp_(&g, 1.0 - c.beta1)?;
                let _ = p.exp_avg_sq.f_mul_scalar_(c.beta2)?.f_addcmul_(&g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
                let denom = p.exp_avg_sq.f_sqrt()?.f_div_scalar(bias2_sqrt)?.f_add_scalar(c.eps)?;
                let _ = target.f_addcdiv_(&p.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
                if p.master.is_some() {
                    let _ = p.param.f_copy_(&target)?;
                }
            }
            Ok(())
        })
    }

    /// Optimizer state as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`, `master.NAME`).
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone());
            if let Some(m) = &p.master {
                out.insert(format!("master.{}", p.name), m.shallow_clone());
            }
        }
        out
    }

    /// Restores state written by `state_tensors` (and the step count).
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let get = |key: String| tensors.get(&key).ok_or_else(|| anyhow!("optimizer state lacks '{key}'"));
                let src = get(format!("exp_avg.{}", p.name))?;
                if src.size() != p.exp_avg.size() {
                    bail!(
                        "optimizer state '{}' has shape {:?}, the parameter {:?}",
                        p.name,
                        src.size(),
                        p.exp_avg.size()
                    );
                }
                let _ = p.exp_avg.f_copy_(src)?;
                let _ = p.exp_avg_sq.f_copy_(get(format!("exp_avg_sq.{}", p.name))?)?;
                if let Some(m) = &mut p.master {
                    let _ = m.f_copy_(get(format!("master.{}", p.name))?)?;
                    let _ = p.param.f_copy_(m)?;
                }
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }

    /// True when every parameter (and master copy) is finite.
    pub fn all_finite(&self) -> Result<bool> {
        // an f16/bf16 parameter can overflow to inf while its f32 master is finite: check both
        for p in &self.params {
            for t in std::iter::once(&p.param).chain(p.master.as_ref()) {
                if t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
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
