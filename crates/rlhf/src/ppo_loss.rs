//! PPO's maths as pure functions of tensors: per-token KL penalty and rewards, GAE, masked
//! whitening, the clipped policy and value losses, and the adaptive KL controller. Definitions
//! follow TRL's PPOTrainer (checked against values from tests/fixtures/make_ppo_fixtures.py).
//! Every `[B, R]` tensor is indexed by response token; `mask` is 1 for real tokens, 0 after the
//! end of a response.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How the per-token KL to the reference is estimated from log-probs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `log π − log π_ref` (unbiased, can be negative per token).
    #[default]
    K1,
    /// `(r − 1) − log r` with `r = π_ref / π` (non-negative, lower variance).
    K3,
}

fn mask_f(mask: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(mask.f_to_kind(like.kind())?)
}

/// Mean of `x` over the positions where `mask` is set (0-d tensor).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask_f(mask, x)?;
    Ok(x.f_mul(&m)?.f_sum(x.kind())?.f_div(&m.f_sum(x.kind())?)?)
}

/// Variance of `x` over `mask`, with Bessel's correction when `unbiased` (needs ≥ 2 positions).
pub fn masked_var(x: &Tensor, mask: &Tensor, unbiased: bool) -> Result<Tensor> {
    let mean = masked_mean(x, mask)?;
    let centred = x.f_sub(&mean)?;
    let var = masked_mean(&centred.f_square()?, mask)?;
    if !unbiased {
        return Ok(var);
    }
    let n = mask_f(mask, x)?.f_sum(Kind::Double)?.f_double_value(&[])?;
    ensure!(n >= 2.0, "whitening needs at least two response tokens, got {n}");
    Ok(var.f_mul_scalar(n / (n - 1.0))?)
}

/// `(x − mean) / sqrt(var + 1e-8)` with masked statistics; with `shift_mean = false` the mean
/// is added back (only the scale changes). Positions outside `mask` are transformed too; callers
/// zero them.
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let mean = masked_mean(x, mask)?;
    let var = masked_var(x, mask, true)?;
    let mut w = x.f_sub(&mean)?.f_mul(&var.f_add_scalar(1e-8)?.f_rsqrt()?)?;
    if !shift_mean {
        w = w.f_add(&mean)?;
    }
    Ok(w)
}

/// `(x − mean) / sqrt(var + 1e-8)` with given statistics (those of several ranks' batches), and
/// `mean` added back when `shift_mean = false`: [`masked_whiten`] once the statistics are known.
pub fn whiten_with(x: &Tensor, mean: f64, var: f64, shift_mean: bool) -> Result<Tensor> {
    let mut w = x.f_sub_scalar(mean)?.f_mul_scalar(1.0 / (var + 1e-8).sqrt())?;
    if !shift_mean {
        w = w.f_add_scalar(mean)?;
    }
    Ok(w)
}

/// Per-token KL estimate between the policy and the reference, `[B, R]`, zero outside `mask`.
pub fn kl_per_token(logprobs: &Tensor, ref_logprobs: &Tensor, mask: &Tensor, estimator: KlEstimator) -> Result<Tensor> {
    let log_ratio = logprobs.f_sub(ref_logprobs)?;
    let kl = match estimator {
        KlEstimator::K1 => log_ratio,
        // r = π_ref/π = exp(−log_ratio): (r − 1) − log r
        KlEstimator::K3 => log_ratio.f_neg()?.f_exp()?.f_sub_scalar(1.0)?.f_add(&log_ratio)?,
    };
    Ok(kl.f_mul(&mask_f(mask, &kl)?)?)
}

/// Index of the last real token of each row, `[B]` (0 for an empty row).
pub fn last_token_index(mask: &Tensor) -> Result<Tensor> {
    Ok(mask.f_to_kind(Kind::Int64)?.f_sum_dim_intlist(1, false, Kind::Int64)?.f_sub_scalar(1)?.f_clamp_min(0)?)
}

/// Per-token rewards `[B, R]`: `−kl_coef · kl` on every response token, plus the sequence's
/// score on its last token. Returns `(rewards, non_score_rewards)`.
pub fn token_rewards(kl: &Tensor, mask: &Tensor, scores: &Tensor, kl_coef: f64) -> Result<(Tensor, Tensor)> {
    let non_score = kl.f_mul_scalar(-kl_coef)?.f_mul(&mask_f(mask, kl)?)?;
    let last = last_token_index(mask)?.f_unsqueeze(1)?;
    let score = scores.f_to_kind(kl.kind())?.f_unsqueeze(1)?;
    let rewards = non_score.f_scatter_add(1, &last, &score)?;
    Ok((rewards, non_score))
}

/// Generalised advantage estimation (Schulman et al. 2016) over response tokens:
/// `δ_t = r_t + γ V_{t+1} − V_t`, `A_t = δ_t + γλ A_{t+1}`, with `V` and `r` zero after the
/// response ends. Returns `(advantages, returns = advantages + values)`, zero outside `mask`.
pub fn gae_advantages(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lam: f64,
) -> Result<(Tensor, Tensor)> {
    let size = rewards.size();
    ensure!(
        size.len() == 2 && values.size() == size && mask.size() == size,
        "gae: rewards, values and mask must be [B, R] alike"
    );
    let m = mask_f(mask, rewards)?;
    let r = rewards.f_mul(&m)?;
    let v = values.f_to_kind(rewards.kind())?.f_mul(&m)?;
    let len = size[1];
    let mut last = Tensor::f_zeros([size[0]], (rewards.kind(), rewards.device()))?;
    let mut reversed = Vec::with_capacity(len as usize);
    for t in (0..len).rev() {
        let next_value = if t + 1 < len { v.f_select(1, t + 1)? } else { Tensor::f_zeros_like(&last)? };
        let delta = r.f_select(1, t)?.f_add(&next_value.f_mul_scalar(gamma)?)?.f_sub(&v.f_select(1, t)?)?;
        last = delta.f_add(&last.f_mul_scalar(gamma * lam)?)?;
        reversed.push(last.shallow_clone());
    }
    reversed.reverse();
    let advantages = Tensor::f_stack(&reversed, 1)?.f_mul(&m)?;
    let returns = advantages.f_add(&v)?;
    Ok((advantages, returns))
}

/// Per-token pieces of the clipped policy objective.
pub struct PolicyLoss {
    /// `max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`, `[B, R]`.
    pub losses: Tensor,
    /// 1 where the clipped term was the larger (the update was clipped), `[B, R]` f32.
    pub clipped: Tensor,
    /// `ρ = exp(log π − log π_old)`, `[B, R]`.
    pub ratio: Tensor,
    /// `½ (log π − log π_old)²`, `[B, R]` (its mean is `policy/approxkl`).
    pub approx_kl: Tensor,
}

/// PPO's clipped surrogate (Schulman et al. 2017), per token; average with [`masked_mean`].
pub fn clipped_policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    cliprange: f64,
) -> Result<PolicyLoss> {
    let diff = logprobs.f_sub(old_logprobs)?;
    let ratio = diff.f_exp()?;
    let unclipped = advantages.f_neg()?.f_mul(&ratio)?;
    let clipped_term = advantages.f_neg()?.f_mul(&ratio.f_clamp(1.0 - cliprange, 1.0 + cliprange)?)?;
    let losses = unclipped.f_maximum(&clipped_term)?;
    let clipped = clipped_term.f_gt_tensor(&unclipped)?.f_to_kind(Kind::Float)?;
    let approx_kl = diff.f_square()?.f_mul_scalar(0.5)?;
    Ok(PolicyLoss { losses, clipped, ratio, approx_kl })
}

/// Per-token pieces of the clipped value loss.
pub struct ValueLoss {
    /// `½ max((V − R)², (clip(V, V_old ± ε_v) − R)²)`, `[B, R]`.
    pub losses: Tensor,
    /// 1 where the clipped error was the larger, `[B, R]` f32.
    pub clipped: Tensor,
}

/// The critic's clipped squared error against the GAE returns, per token.
pub fn clipped_value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    cliprange_value: f64,
) -> Result<ValueLoss> {
    let lo = old_values.f_sub_scalar(cliprange_value)?;
    let hi = old_values.f_add_scalar(cliprange_value)?;
    let clipped_values = values.f_maximum(&lo)?.f_minimum(&hi)?;
    let e1 = values.f_sub(returns)?.f_square()?;
    let e2 = clipped_values.f_sub(returns)?.f_square()?;
    let losses = e1.f_maximum(&e2)?.f_mul_scalar(0.5)?;
    let clipped = e2.f_gt_tensor(&e1)?.f_to_kind(Kind::Float)?;
    Ok(ValueLoss { losses, clipped })
}

/// Ziegler et al.'s adaptive KL coefficient: after each iteration
/// `coef *= 1 + clip(KL/target − 1, ±0.2) · n / horizon`, `n` the rollouts of the iteration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKl {
    pub coef: f64,
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    pub fn update(&mut self, current_kl: f64, n_rollouts: usize) {
        if !current_kl.is_finite() {
            return;
        }
        let error = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.coef *= 1.0 + error * n_rollouts as f64 / self.horizon;
    }
}

/// Running mean and variance (Welford) of the scores, for `normalize_reward`; saved with every
/// checkpoint so a resumed run normalises exactly as an uninterrupted one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMoments {
    pub count: f64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl RunningMoments {
    pub fn update(&mut self, xs: &[f64]) {
        for &x in xs.iter().filter(|x| x.is_finite()) {
            self.count += 1.0;
            let delta = x - self.mean;
            self.mean += delta / self.count;
            self.m2 += delta * (x - self.mean);
        }
    }

    /// Standard deviation (population form; 1 until two values have been seen).
    pub fn std(&self) -> f64 {
        if self.count < 2.0 {
            1.0
        } else {
            (self.m2 / self.count).sqrt().max(1e-8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn t2(rows: &[&[f64]]) -> Tensor {
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
    }

    fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
        let s = t.size();
        (0..s[0]).map(|i| Vec::<f64>::try_from(t.get(i).to_kind(Kind::Double)).unwrap()).collect()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn gae_matches_a_hand_computed_example() {
        // one row of 3 tokens then padding; γ = 0.9, λ = 0.5
        let r = t2(&[&[0.0, 0.0, 1.0, 7.0]]);
        let v = t2(&[&[0.5, 0.2, 0.4, 9.0]]);
        let m = t2(&[&[1.0, 1.0, 1.0, 0.0]]);
        let (a, ret) = gae_advantages(&r, &v, &m, 0.9, 0.5).unwrap();
        // δ2 = 1 − 0.4 = 0.6; δ1 = 0 + 0.9·0.4 − 0.2 = 0.16; δ0 = 0.9·0.2 − 0.5 = −0.32
        // A2 = 0.6; A1 = 0.16 + 0.45·0.6 = 0.43; A0 = −0.32 + 0.45·0.43 = −0.1265
        let want = [-0.1265, 0.43, 0.6, 0.0];
        for (got, want) in vec2(&a)[0].iter().zip(want) {
            assert!(close(*got, want, 1e-12), "{got} vs {want}");
        }
        let want_ret = [-0.1265 + 0.5, 0.43 + 0.2, 0.6 + 0.4, 0.0];
        for (got, want) in vec2(&ret)[0].iter().zip(want_ret) {
            assert!(close(*got, want, 1e-12), "{got} vs {want}");
        }
        // γ = λ = 1 and V = 0: the advantage is the reward-to-go
        let (a, _) =
            gae_advantages(&t2(&[&[1.0, 2.0, 3.0]]), &t2(&[&[0.0, 0.0, 0.0]]), &t2(&[&[1.0, 1.0, 1.0]]), 1.0, 1.0)
                .unwrap();
        assert_eq!(vec2(&a)[0], vec![6.0, 5.0, 3.0]);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance_over_the_mask() {
        let x = t2(&[&[1.0, 2.0, 3.0, 100.0], &[4.0, 5.0, -50.0, 6.0]]);
        let m = t2(&[&[1.0, 1.0, 1.0, 0.0], &[1.0, 1.0, 0.0, 1.0]]);
        let w = masked_whiten(&x, &m, true).unwrap();
        // masked values 1..6: mean 3.5, unbiased var 3.5
        let s = 3.5f64.sqrt();
        let got = vec2(&w);
        assert!(close(got[0][0], (1.0 - 3.5) / s, 1e-6) && close(got[1][3], (6.0 - 3.5) / s, 1e-6), "{got:?}");
        assert!(masked_mean(&w, &m).unwrap().double_value(&[]).abs() < 1e-9);
        assert!(close(masked_var(&w, &m, true).unwrap().double_value(&[]), 1.0, 1e-6));
        let kept = masked_whiten(&x, &m, false).unwrap();
        assert!(close(masked_mean(&kept, &m).unwrap().double_value(&[]), 3.5, 1e-9));
        assert!(masked_var(&t2(&[&[1.0, 2.0]]), &t2(&[&[1.0, 0.0]]), true).is_err());
    }

    #[test]
    fn token_rewards_put_the_score_on_the_last_real_token() {
        let kl = t2(&[&[0.1, 0.2, 0.3], &[0.5, 0.0, 0.0]]);
        let m = t2(&[&[1.0, 1.0, 1.0], &[1.0, 0.0, 0.0]]);
        let (r, ns) = token_rewards(&kl, &m, &Tensor::from_slice(&[2.0f64, -1.0]), 0.5).unwrap();
        assert_eq!(vec2(&ns), vec![vec![-0.05, -0.1, -0.15], vec![-0.25, 0.0, 0.0]]);
        assert_eq!(vec2(&r), vec![vec![-0.05, -0.1, 1.85], vec![-1.25, 0.0, 0.0]]);
    }

    #[test]
    fn k3_is_non_negative_and_zero_at_equality() {
        let lp = t2(&[&[-1.0, -2.0, -0.5]]);
        let rp = t2(&[&[-1.5, -1.0, -0.5]]);
        let k3 = kl_per_token(&lp, &rp, &t2(&[&[1.0, 1.0, 1.0]]), KlEstimator::K3).unwrap();
        let v = &vec2(&k3)[0];
        assert!(v.iter().all(|&x| x >= 0.0) && v[2] == 0.0, "{v:?}");
        let k1 = kl_per_token(&lp, &rp, &t2(&[&[1.0, 1.0, 0.0]]), KlEstimator::K1).unwrap();
        assert_eq!(vec2(&k1)[0], vec![0.5, -1.0, 0.0]);
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target_by_at_most_twenty_percent() {
        let mut c = AdaptiveKl { coef: 0.1, target: 6.0, horizon: 100.0 };
        c.update(12.0, 100); // error clipped to +0.2 → ×1.2
        assert!(close(c.coef, 0.12, 1e-12));
        c.update(3.0, 50); // error −0.5 → −0.2, × (1 − 0.2·0.5)
        assert!(close(c.coef, 0.12 * 0.9, 1e-12));
        c.update(f64::NAN, 50);
        assert!(close(c.coef, 0.108, 1e-12));
    }

    #[test]
    fn running_moments_match_the_batch_statistics() {
        let mut m = RunningMoments::default();
        m.update(&[1.0, 2.0]);
        m.update(&[3.0, 4.0, f64::NAN]);
        assert_eq!(m.count, 4.0);
        assert!(close(m.mean, 2.5, 1e-12) && close(m.std(), 1.25f64.sqrt(), 1e-12));
    }

    /// Reference values from TRL's definitions (tests/fixtures/make_ppo_fixtures.py).
    #[test]
    fn losses_match_trl_fixtures() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ppo_losses.json");
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() >= 3);
        let mat = |v: &Value| -> Tensor {
            let rows: Vec<Vec<f64>> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
                .collect();
            let refs: Vec<&[f64]> = rows.iter().map(|r| r.as_slice()).collect();
            t2(&refs)
        };
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let p = &case["params"];
            let (gamma, lam) = (p["gamma"].as_f64().unwrap(), p["lam"].as_f64().unwrap());
            let (cliprange, cliprange_value) =
                (p["cliprange"].as_f64().unwrap(), p["cliprange_value"].as_f64().unwrap());
            let kl_coef = p["kl_coef"].as_f64().unwrap();
            let i = &case["inputs"];
            let mask = mat(&i["mask"]);
            let logprobs = mat(&i["logprobs"]);
            let ref_logprobs = mat(&i["ref_logprobs"]);
            let values = mat(&i["values"]);
            let scores: Vec<f64> = i["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let scores = Tensor::from_slice(&scores);
            let o = &case["outputs"];
            let check_mat = |what: &str, got: &Tensor| {
                let want = mat(&o[what]);
                let diff = got.f_sub(&want).unwrap().abs().max().double_value(&[]);
                assert!(diff < 1e-9, "{name}: {what} differs by {diff}");
            };
            let check = |what: &str, got: f64| {
                let want = o[what].as_f64().unwrap();
                assert!(close(got, want, 1e-9), "{name}: {what} = {got}, TRL {want}");
            };
            let estimator = if p["kl_estimator"].as_str() == Some("k3") { KlEstimator::K3 } else { KlEstimator::K1 };
            let kl = kl_per_token(&logprobs, &ref_logprobs, &mask, estimator).unwrap();
            let (rewards, _) = token_rewards(&kl, &mask, &scores, kl_coef).unwrap();
            check_mat("rewards", &rewards);
            let (adv, returns) = gae_advantages(&rewards, &values, &mask, gamma, lam).unwrap();
            check_mat("returns", &returns);
            let whitened = masked_whiten(&adv, &mask, true).unwrap().f_mul(&mask).unwrap();
            check_mat("advantages", &whitened);
            let new_logprobs = mat(&i["new_logprobs"]);
            let new_values = mat(&i["new_values"]);
            let pl = clipped_policy_loss(&new_logprobs, &logprobs, &whitened, cliprange).unwrap();
            check("pg_loss", masked_mean(&pl.losses, &mask).unwrap().double_value(&[]));
            check("pg_clipfrac", masked_mean(&pl.clipped.to_kind(Kind::Double), &mask).unwrap().double_value(&[]));
            check("approxkl", masked_mean(&pl.approx_kl, &mask).unwrap().double_value(&[]));
            let vl = clipped_value_loss(&new_values, &values.f_mul(&mask).unwrap(), &returns, cliprange_value).unwrap();
            check("vf_loss", masked_mean(&vl.losses, &mask).unwrap().double_value(&[]));
            check("vf_clipfrac", masked_mean(&vl.clipped.to_kind(Kind::Double), &mask).unwrap().double_value(&[]));
            check("kl", kl.sum_dim_intlist(1, false, Kind::Double).mean(Kind::Double).double_value(&[]));
        }
    }
}
