//! The maths of GRPO and its relatives as pure functions: group-relative advantages (GRPO with
//! TRL's `scale_rewards`, Dr. GRPO's mean-only baseline, RLOO's leave-one-out baseline,
//! REINFORCE++'s global-batch normalisation), the token-level clipped objective with
//! clip-higher (DAPO), sequence-level importance ratios (GSPO), CISPO's clipped-weight loss, the
//! k3 KL to the reference and the `loss_type` aggregations (grpo, bnpo, dr_grpo, dapo, cispo).
//! Definitions follow TRL 1.16's GRPOTrainer (`_generate_and_score_completions`,
//! `_compute_loss`), checked against tests/fixtures/make_grpo_fixtures.py. Every `[B, T]` tensor
//! is indexed by completion token; `mask` is 1 on real completion tokens.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How a completion's advantage is made from the rewards of its group (`num_generations`
/// completions of one prompt) — the one thing that differs between GRPO, RLOO and REINFORCE++.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// `r − mean(group)`, divided by the std chosen by [`ScaleRewards`].
    Grpo,
    /// `r − mean(the other completions of the group)`, optionally normalised over the batch.
    Rloo,
    /// `(r − mean(batch)) / std(batch)` (REINFORCE++; `-baseline` subtracts the group mean first).
    ReinforcePp,
}

/// TRL's `scale_rewards`: which standard deviation divides GRPO's advantages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// The group's std (GRPO).
    #[default]
    Group,
    /// The whole batch's std.
    Batch,
    /// None: `r − mean(group)` only (Dr. GRPO).
    None,
}

/// The small constant TRL adds to the std it divides by.
pub const STD_EPS: f64 = 1e-4;

/// Unbiased (Bessel) standard deviation, as `torch.std`; NaN for fewer than two values.
pub fn std_unbiased(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Advantages of one batch of rewards laid out group after group, and the per-group statistics
/// the metrics report.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    pub advantages: Vec<f64>,
    /// Each group's unbiased reward std (TRL's `reward_std` is their mean).
    pub group_std: Vec<f64>,
    /// Groups whose rewards are all equal (std ≈ 0; TRL's `frac_reward_zero_std`, `torch.isclose`).
    pub zero_std: Vec<bool>,
}

/// `torch.isclose(x, 0)` with its default tolerances.
fn is_close_to_zero(x: f64) -> bool {
    x.abs() <= 1e-8
}

/// The advantages of `rewards` (`[B]`, groups of `group` consecutive completions).
/// `scale` applies to GRPO, `normalize` to RLOO (TRL's `normalize_advantages`), and with
/// `group_baseline` REINFORCE++ subtracts the group mean before its batch normalisation
/// (REINFORCE++-baseline).
pub fn group_advantages(
    rewards: &[f64],
    group: usize,
    estimator: AdvantageEstimator,
    scale: ScaleRewards,
    normalize: bool,
) -> Result<GroupAdvantages> {
    ensure!(group >= 2, "advantages: a group needs at least 2 completions, got {group}");
    ensure!(
        !rewards.is_empty() && rewards.len() % group == 0,
        "advantages: {} rewards do not split into groups of {group}",
        rewards.len()
    );
    let groups: Vec<&[f64]> = rewards.chunks(group).collect();
    let group_std: Vec<f64> = groups.iter().map(|g| std_unbiased(g)).collect();
    let zero_std: Vec<bool> = group_std.iter().map(|&s| is_close_to_zero(s)).collect();
    let batch_std = std_unbiased(rewards);
    let mut advantages = Vec::with_capacity(rewards.len());
    match estimator {
        AdvantageEstimator::Grpo => {
            for (g, &s) in groups.iter().zip(&group_std) {
                let m = mean(g);
                for &r in g.iter() {
                    let a = r - m;
                    advantages.push(match scale {
                        ScaleRewards::Group => a / (s + STD_EPS),
                        ScaleRewards::Batch => a / (batch_std + STD_EPS),
                        ScaleRewards::None => a,
                    });
                }
            }
        }
        AdvantageEstimator::Rloo => {
            let k = group as f64;
            for g in &groups {
                let sum: f64 = g.iter().sum();
                advantages.extend(g.iter().map(|&r| r - (sum - r) / (k - 1.0)));
            }
            if normalize {
                normalize_in_place(&mut advantages);
            }
        }
        AdvantageEstimator::ReinforcePp => {
            if normalize {
                for g in &groups {
                    let m = mean(g);
                    advantages.extend(g.iter().map(|&r| r - m));
                }
            } else {
                advantages.extend_from_slice(rewards);
            }
            normalize_in_place(&mut advantages);
        }
    }
    Ok(GroupAdvantages { advantages, group_std, zero_std })
}

/// `(x − mean(x)) / (std(x) + 1e-4)` over the whole batch.
fn normalize_in_place(x: &mut [f64]) {
    let (m, s) = (mean(x), std_unbiased(x));
    for v in x.iter_mut() {
        *v = (*v - m) / (s + STD_EPS);
    }
}

/// TRL's `loss_type`: how per-token losses are reduced to the step's loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then over the sequences.
    Grpo,
    /// Mean over the tokens of the local (micro-)batch.
    Bnpo,
    /// Sum over tokens / (sequences × `max_completion_length`).
    DrGrpo,
    /// Sum over tokens / tokens of the whole step (DAPO's token-level mean).
    #[default]
    Dapo,
    /// CISPO: `−sg(min(ρ, ε_high)) · A · log π`, aggregated as dapo.
    Cispo,
}

/// TRL's `importance_sampling_level`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceLevel {
    /// One ratio per token.
    #[default]
    Token,
    /// GSPO: one ratio per sequence, `exp(mean over its tokens of log π − log π_old)`.
    Sequence,
}

/// The knobs of the per-token objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossParams {
    /// ε_low (TRL's `epsilon`).
    pub epsilon_low: f64,
    /// ε_high (TRL's `epsilon_high`); CISPO's upper bound on its weight.
    pub epsilon_high: f64,
    /// KL coefficient β (0 = no KL term).
    pub beta: f64,
    pub loss_type: LossType,
    pub level: ImportanceLevel,
}

/// The per-token objective and what the metrics read from it.
pub struct PolicyLossOutput {
    /// `[B, T]`, the loss of each token (KL term included), not masked.
    pub per_token_loss: Tensor,
    /// `[B, T]` k3 KL to the reference, when `beta ≠ 0`.
    pub kl: Option<Tensor>,
    /// `[B, T]` (token level) or `[B, 1]` (sequence level) importance ratio `coef_1`.
    pub ratio: Tensor,
    /// `ratio < 1 − ε_low` where `A < 0`; `ratio > 1 + ε_high` where `A > 0`; either — f32, the
    /// shape of `ratio` broadcast with the advantages.
    pub low_clipped: Tensor,
    pub high_clipped: Tensor,
    pub region_clipped: Tensor,
}

/// k3 estimator of the KL from the policy to the reference per token:
/// `exp(ref − logp) − (ref − logp) − 1` (TRL's `per_token_kl`).
pub fn k3_kl(logps: &Tensor, ref_logps: &Tensor) -> Result<Tensor> {
    let d = ref_logps.f_sub(logps)?;
    Ok(d.f_exp()?.f_sub(&d)?.f_sub_scalar(1.0)?)
}

/// The per-token loss of TRL's `_compute_loss`: importance ratio `ρ = exp(log π − log π_old)`
/// (per token, or GSPO's per-sequence mean of the log-ratio), then
/// `−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)` — or CISPO's `−sg(min(ρ, ε_high))·A·log π` — plus
/// `β · k3(π, π_ref)`. `advantages` is `[B]`, the rest `[B, T]`.
pub fn policy_loss(
    logps: &Tensor,
    old_logps: &Tensor,
    ref_logps: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    p: &PolicyLossParams,
) -> Result<PolicyLossOutput> {
    let size = logps.size();
    ensure!(
        size.len() == 2 && old_logps.size() == size && mask.size() == size && advantages.size() == [size[0]],
        "policy_loss: log-probs {size:?}, old log-probs {:?}, mask {:?} and advantages {:?} do not match",
        old_logps.size(),
        mask.size(),
        advantages.size()
    );
    let m = mask.f_to_kind(logps.kind())?;
    let a = advantages.f_to_kind(logps.kind())?.f_unsqueeze(1)?;
    let log_ratio = logps.f_sub(old_logps)?;
    let log_weights = match p.level {
        ImportanceLevel::Token => log_ratio,
        ImportanceLevel::Sequence => log_ratio
            .f_mul(&m)?
            .f_sum_dim_intlist(-1, false, logps.kind())?
            .f_div(&m.f_sum_dim_intlist(-1, false, logps.kind())?.f_clamp_min(1.0)?)?
            .f_unsqueeze(-1)?,
    };
    let ratio = log_weights.f_exp()?;
    let mut loss = match p.loss_type {
        LossType::Cispo => {
            let weight = ratio.f_clamp_max(p.epsilon_high)?.f_detach()?;
            weight.f_mul(&a)?.f_mul(logps)?.f_neg()?
        }
        _ => {
            let clipped = ratio.f_clamp(1.0 - p.epsilon_low, 1.0 + p.epsilon_high)?;
            ratio.f_mul(&a)?.f_minimum(&clipped.f_mul(&a)?)?.f_neg()?
        }
    };
    let kl = match ref_logps {
        Some(r) if p.beta != 0.0 => {
            let kl = k3_kl(logps, r)?;
            loss = loss.f_add(&kl.f_mul_scalar(p.beta)?)?;
            Some(kl)
        }
        _ => None,
    };
    let kind = logps.kind();
    let low = ratio.f_lt(1.0 - p.epsilon_low)?.f_logical_and(&a.f_lt(0.0)?)?;
    let high = ratio.f_gt(1.0 + p.epsilon_high)?.f_logical_and(&a.f_gt(0.0)?)?;
    let region = low.f_logical_or(&high)?;
    Ok(PolicyLossOutput {
        per_token_loss: loss,
        kl,
        ratio,
        low_clipped: low.f_to_kind(kind)?,
        high_clipped: high.f_to_kind(kind)?,
        region_clipped: region.f_to_kind(kind)?,
    })
}

/// What the aggregation of one micro-batch divides by, besides its own tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossNormaliser {
    /// Completions in the optimizer step (over all its micro-batches).
    pub sequences: f64,
    /// Completion tokens in the optimizer step.
    pub tokens: f64,
    /// Micro-batches in the step (TRL divides the local-batch losses by its accumulation steps).
    pub micro_batches: f64,
    /// `max_completion_length` (Dr. GRPO's constant).
    pub max_completion_length: f64,
}

/// One micro-batch's share of the step's loss under `loss_type` (the step's loss is the sum of
/// the shares): TRL's aggregations with its division by the accumulation steps.
/// * `grpo`: Σ_seq (Σ_t l·m / max(Σ_t m, 1)) / sequences of the step;
/// * `bnpo`: (Σ l·m / max(Σ m, 1)) / micro-batches (mean over the local batch's tokens);
/// * `dr_grpo`: Σ l·m / (sequences of the step × max_completion_length);
/// * `dapo`, `cispo`: Σ l·m / tokens of the step.
pub fn aggregate_loss(
    per_token_loss: &Tensor,
    mask: &Tensor,
    loss_type: LossType,
    n: &LossNormaliser,
) -> Result<Tensor> {
    let kind = per_token_loss.kind();
    let m = mask.f_to_kind(kind)?;
    let lm = per_token_loss.f_mul(&m)?;
    Ok(match loss_type {
        LossType::Grpo => lm
            .f_sum_dim_intlist(-1, false, kind)?
            .f_div(&m.f_sum_dim_intlist(-1, false, kind)?.f_clamp_min(1.0)?)?
            .f_sum(kind)?
            .f_div_scalar(n.sequences)?,
        LossType::Bnpo => lm.f_sum(kind)?.f_div(&m.f_sum(kind)?.f_clamp_min(1.0)?)?.f_div_scalar(n.micro_batches)?,
        LossType::DrGrpo => lm.f_sum(kind)?.f_div_scalar(n.sequences * n.max_completion_length)?,
        LossType::Dapo | LossType::Cispo => lm.f_sum(kind)?.f_div_scalar(n.tokens.max(1.0))?,
    })
}

/// Sum of `x` (broadcast to the mask) over the masked tokens, as f64.
pub fn masked_sum(x: &Tensor, mask: &Tensor) -> Result<f64> {
    let m = mask.f_to_kind(Kind::Double)?;
    Ok(x.f_to_kind(Kind::Double)?.f_mul(&m)?.f_sum(Kind::Double)?.f_double_value(&[])?)
}

/// Soft overlong punishment (DAPO; TRL's `get_soft_overlong_punishment`): 0 up to
/// `max_len − buffer` tokens, then falling linearly to −1 at `max_len`, −1 beyond.
pub fn soft_overlong_punishment(length: usize, max_len: usize, buffer: usize) -> f64 {
    let expected = max_len.saturating_sub(buffer);
    if length <= expected {
        0.0
    } else if length <= max_len {
        (expected as f64 - length as f64) / buffer.max(1) as f64
    } else {
        -1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1e-12) || (a - b).abs() < 1e-12
    }

    #[test]
    fn grpo_advantages_by_hand() {
        let r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0];
        let g = group_advantages(&r, 4, AdvantageEstimator::Grpo, ScaleRewards::Group, false).unwrap();
        // group 1: mean 0.5, std sqrt(1/3)
        let s = (1.0f64 / 3.0).sqrt();
        assert!(close(g.advantages[0], 0.5 / (s + 1e-4)));
        assert!(close(g.advantages[1], -0.5 / (s + 1e-4)));
        assert_eq!(&g.advantages[4..], &[0.0; 4]);
        assert_eq!(g.zero_std, vec![false, true]);
        let dr = group_advantages(&r, 4, AdvantageEstimator::Grpo, ScaleRewards::None, false).unwrap();
        assert_eq!(dr.advantages, vec![0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
        // RLOO: 1 − (0 + 0 + 1)/3
        let rloo = group_advantages(&r, 4, AdvantageEstimator::Rloo, ScaleRewards::Group, false).unwrap();
        assert!(close(rloo.advantages[0], 2.0 / 3.0) && close(rloo.advantages[1], -2.0 / 3.0));
        // REINFORCE++: batch-normalised rewards have mean 0 and std ≈ 1
        let pp = group_advantages(&r, 4, AdvantageEstimator::ReinforcePp, ScaleRewards::Group, false).unwrap();
        assert!(mean(&pp.advantages).abs() < 1e-12);
        assert!((std_unbiased(&pp.advantages) - 1.0).abs() < 1e-3);
        assert!(group_advantages(&r, 3, AdvantageEstimator::Grpo, ScaleRewards::Group, false).is_err());
    }

    #[test]
    fn overlong_punishment_by_hand() {
        assert_eq!(soft_overlong_punishment(10, 20, 4), 0.0);
        assert_eq!(soft_overlong_punishment(16, 20, 4), 0.0);
        assert_eq!(soft_overlong_punishment(18, 20, 4), -0.5);
        assert_eq!(soft_overlong_punishment(20, 20, 4), -1.0);
        assert_eq!(soft_overlong_punishment(21, 20, 4), -1.0);
    }

    fn vec_of(v: &Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    fn mat(v: &Value) -> Tensor {
        let rows: Vec<Vec<f64>> = v.as_array().unwrap().iter().map(vec_of).collect();
        let (b, t) = (rows.len() as i64, rows[0].len() as i64);
        Tensor::from_slice(&rows.concat()).view([b, t])
    }

    fn check(what: &str, got: f64, want: f64) {
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-6), "{what}: got {got:.12e}, TRL gives {want:.12e}");
    }

    /// TRL 1.16's advantages and `_compute_loss` (tests/fixtures/make_grpo_fixtures.py).
    #[test]
    fn advantages_and_losses_match_trl_fixtures() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/grpo_losses.json");
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let adv_cases = fx["advantages"].as_array().unwrap();
        assert!(adv_cases.len() >= 4);
        for case in adv_cases {
            let name = case["name"].as_str().unwrap();
            let rewards = vec_of(&case["rewards"]);
            let group = case["num_generations"].as_u64().unwrap() as usize;
            let estimator: AdvantageEstimator = serde_json::from_value(case["estimator"].clone()).unwrap();
            let scale: ScaleRewards = serde_json::from_value(case["scale_rewards"].clone()).unwrap();
            let normalize = case["normalize"].as_bool().unwrap();
            let got = group_advantages(&rewards, group, estimator, scale, normalize).unwrap();
            let want = vec_of(&case["advantages"]);
            for (i, (g, w)) in got.advantages.iter().zip(&want).enumerate() {
                check(&format!("{name} advantage {i}"), *g, *w);
            }
            let zero: Vec<bool> = case["zero_std"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect();
            assert_eq!(got.zero_std, zero, "{name}");
        }
        let cases = fx["losses"].as_array().unwrap();
        assert!(cases.len() >= 8);
        let i = &fx["loss_inputs"];
        let (logps, old, reference, mask) =
            (mat(&i["logps"]), mat(&i["old_logps"]), mat(&i["ref_logps"]), mat(&i["mask"]));
        let advantages = Tensor::from_slice(&vec_of(&i["advantages"]));
        let max_len = i["max_completion_length"].as_f64().unwrap();
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let p = &case["params"];
            let params = PolicyLossParams {
                epsilon_low: p["epsilon"].as_f64().unwrap(),
                epsilon_high: p["epsilon_high"].as_f64().unwrap(),
                beta: p["beta"].as_f64().unwrap(),
                loss_type: serde_json::from_value(p["loss_type"].clone()).unwrap(),
                level: serde_json::from_value(p["importance_sampling_level"].clone()).unwrap(),
            };
            let logps = logps.detach().set_requires_grad(true);
            let out = policy_loss(&logps, &old, Some(&reference), &advantages, &mask, &params).unwrap();
            let b = logps.size()[0] as f64;
            let norm = LossNormaliser {
                sequences: b,
                tokens: mask.sum(Kind::Double).double_value(&[]),
                micro_batches: 1.0,
                max_completion_length: max_len,
            };
            let loss = aggregate_loss(&out.per_token_loss, &mask, params.loss_type, &norm).unwrap();
            let o = &case["outputs"];
            check(&format!("{name} loss"), loss.double_value(&[]), o["loss"].as_f64().unwrap());
            loss.backward();
            let grad = logps.grad();
            let want_grad = mat(&o["grad"]);
            let gd = (&grad - &want_grad).abs().max().double_value(&[]);
            let scale = want_grad.abs().max().double_value(&[]).max(1e-6);
            assert!(gd <= 1e-6 * scale, "{name}: gradient differs from TRL's by {gd:e}");
            let tokens = norm.tokens;
            let token_mean = |x: &Tensor| masked_sum(x, &mask).unwrap() / tokens;
            if let Some(kl) = &out.kl {
                check(&format!("{name} kl"), token_mean(kl), o["kl"].as_f64().unwrap());
            }
            let (low, high, region) = if params.level == ImportanceLevel::Token {
                (token_mean(&out.low_clipped), token_mean(&out.high_clipped), token_mean(&out.region_clipped))
            } else {
                let m = |x: &Tensor| x.mean(Kind::Double).double_value(&[]);
                (m(&out.low_clipped), m(&out.high_clipped), m(&out.region_clipped))
            };
            if params.loss_type != LossType::Cispo {
                check(&format!("{name} low_clip"), low, o["low_clip"].as_f64().unwrap());
                check(&format!("{name} high_clip"), high, o["high_clip"].as_f64().unwrap());
                check(&format!("{name} region_clip"), region, o["region_clip"].as_f64().unwrap());
            }
        }
    }
}
