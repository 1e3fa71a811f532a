//! The DPO family of preference losses (sigmoid/cDPO, IPO, hinge, SimPO, ORPO, optional SFT
//! term) as pure functions of per-pair log-prob tensors; they know nothing of models or batches.
use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Which preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// DPO: −log σ(β·Δ); with `label_smoothing` ε > 0 the conservative form (cDPO).
    #[default]
    Sigmoid,
    /// IPO: (Δ̄ − 1/(2β))², Δ̄ the log-ratio difference per answer token.
    Ipo,
    /// SLiC hinge: max(0, 1 − β·Δ).
    Hinge,
    /// SimPO: reference-free, on average log-probs, with a target margin γ.
    Simpo,
    /// ORPO: reference-free odds-ratio term on average log-probs plus the chosen answer's NLL.
    Orpo,
}

impl DpoLossType {
    pub fn as_str(self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Ipo => "ipo",
            DpoLossType::Hinge => "hinge",
            DpoLossType::Simpo => "simpo",
            DpoLossType::Orpo => "orpo",
        }
    }

    /// Whether the loss compares the policy with a reference model.
    pub fn needs_reference(self) -> bool {
        matches!(self, DpoLossType::Sigmoid | DpoLossType::Ipo | DpoLossType::Hinge)
    }
}

/// The numbers a preference loss depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoLossParams {
    pub loss: DpoLossType,
    /// Inverse temperature β (sigmoid, ipo, hinge, simpo).
    pub beta: f64,
    /// Probability ε that a label is flipped (sigmoid → cDPO, simpo); 0 = plain.
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ (the logits are shifted by γ/β).
    pub simpo_gamma: f64,
    /// Weight of ORPO's odds-ratio term (TRL's ORPO `beta`, the paper's λ).
    pub orpo_alpha: f64,
    /// Weight of an extra NLL term on the chosen answer (mean per answer token); 0 = none.
    pub sft_weight: f64,
}

impl Default for DpoLossParams {
    fn default() -> Self {
        DpoLossParams {
            loss: DpoLossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            orpo_alpha: 0.1,
            sft_weight: 0.0,
        }
    }
}

impl DpoLossParams {
    /// Checks the values against what the chosen loss accepts; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if !self.beta.is_finite() || self.beta <= 0.0 {
            bail!("'beta': expected a positive number, found {}", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!("'label_smoothing': expected a number in [0, 0.5), found {}", self.label_smoothing);
        }
        if self.label_smoothing > 0.0 && !matches!(self.loss, DpoLossType::Sigmoid | DpoLossType::Simpo) {
            bail!("'label_smoothing': only the sigmoid and simpo losses use it (loss = '{}')", self.loss.as_str());
        }
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !non_negative(self.sft_weight) || !non_negative(self.orpo_alpha) || !self.simpo_gamma.is_finite() {
            bail!("'sft_weight' and 'orpo_alpha': expected numbers ≥ 0, 'simpo_gamma' a finite number");
        }
        Ok(())
    }
}

/// Per-pair inputs of a preference loss, each `[B]`: log-probs SUMMED over the answer tokens
/// and the number of answer tokens. The loss divides by the token counts itself where its
/// definition uses averages (IPO, SimPO, ORPO, the SFT term), so a caller cannot mix them up.
/// The reference log-probs may be `None` for the reference-free losses (simpo, orpo).
pub struct PairLogps<'a> {
    pub policy_chosen_logps: &'a Tensor,
    pub policy_rejected_logps: &'a Tensor,
    pub ref_chosen_logps: Option<&'a Tensor>,
    pub ref_rejected_logps: Option<&'a Tensor>,
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

/// A preference loss's result, each `[B]`. Rewards are detached (for metrics only).
pub struct DpoLossOutput {
    /// Loss of each pair (the objective is their mean).
    pub loss: Tensor,
    /// β·(log π − log π_ref) of the chosen answer (sigmoid, ipo, hinge); β·mean log π (simpo);
    /// orpo_alpha·mean log π (orpo) — as TRL logs `rewards/chosen`.
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// −(1−ε)·log σ(z) − ε·log σ(−z).
fn smoothed_logsigmoid_loss(z: &Tensor, eps: f64) -> Result<Tensor> {
    let clean = z.f_log_sigmoid()?.f_mul_scalar(-(1.0 - eps))?;
    if eps == 0.0 {
        return Ok(clean);
    }
    Ok(clean.f_sub(&z.f_neg()?.f_log_sigmoid()?.f_mul_scalar(eps)?)?)
}

/// log(1 − exp(x)) for x < 0, stable on both sides of −ln 2.
pub fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let near_zero = x.f_expm1()?.f_neg()?.f_log()?; // log(-(exp(x) - 1))
    let far = x.f_exp()?.f_neg()?.f_log1p()?;
    Ok(far.f_where_self(&x.f_lt(-std::f64::consts::LN_2)?, &near_zero)?)
}

/// The preference loss of each pair; see [`DpoLossType`] for the formulas and `docs/rlhf.md`.
pub fn dpo_loss(x: &PairLogps, p: &DpoLossParams) -> Result<DpoLossOutput> {
    let n = x.policy_chosen_logps.size();
    for (name, t) in [
        ("policy_rejected_logps", x.policy_rejected_logps),
        ("chosen_tokens", x.chosen_tokens),
        ("rejected_tokens", x.rejected_tokens),
    ] {
        ensure!(t.size() == n, "dpo_loss: {name} has shape {:?}, policy_chosen_logps {n:?}", t.size());
    }
    let beta = p.beta;
    let avg_chosen = x.policy_chosen_logps.f_div(&x.chosen_tokens.f_clamp_min(1.0)?)?;
    let (loss, chosen_rewards, rejected_rewards) = match p.loss {
        DpoLossType::Sigmoid | DpoLossType::Ipo | DpoLossType::Hinge => {
            let (rc, rr) = x
                .ref_chosen_logps
                .zip(x.ref_rejected_logps)
                .ok_or_else(|| anyhow!("dpo_loss: loss '{}' needs the reference log-probs", p.loss.as_str()))?;
            ensure!(rc.size() == n && rr.size() == n, "dpo_loss: reference log-probs do not match the policy's {n:?}");
            let chosen_ratio = x.policy_chosen_logps.f_sub(rc)?;
            let rejected_ratio = x.policy_rejected_logps.f_sub(rr)?;
            let delta = chosen_ratio.f_sub(&rejected_ratio)?;
            let loss = match p.loss {
                DpoLossType::Sigmoid => smoothed_logsigmoid_loss(&delta.f_mul_scalar(beta)?, p.label_smoothing)?,
                DpoLossType::Hinge => delta.f_mul_scalar(-beta)?.f_add_scalar(1.0)?.f_relu()?,
                _ => {
                    // IPO on the log-ratio difference per answer token (as TRL normalises it)
                    let per_token = chosen_ratio
                        .f_div(&x.chosen_tokens.f_clamp_min(1.0)?)?
                        .f_sub(&rejected_ratio.f_div(&x.rejected_tokens.f_clamp_min(1.0)?)?)?;
                    per_token.f_sub_scalar(1.0 / (2.0 * beta))?.f_square()?
                }
            };
            (loss, chosen_ratio.f_mul_scalar(beta)?, rejected_ratio.f_mul_scalar(beta)?)
        }
        DpoLossType::Simpo => {
            let avg_rejected = x.policy_rejected_logps.f_div(&x.rejected_tokens.f_clamp_min(1.0)?)?;
            let logits = avg_chosen.f_sub(&avg_rejected)?.f_sub_scalar(p.simpo_gamma / beta)?;
            let loss = smoothed_logsigmoid_loss(&logits.f_mul_scalar(beta)?, p.label_smoothing)?;
            (loss, avg_chosen.f_mul_scalar(beta)?, avg_rejected.f_mul_scalar(beta)?)
        }
        DpoLossType::Orpo => {
            let avg_rejected = x.policy_rejected_logps.f_div(&x.rejected_tokens.f_clamp_min(1.0)?)?;
            // an average log-prob of exactly 0 (probability 1) would make the odds infinite
            let (c, r) = (avg_chosen.f_clamp_max(-1e-7)?, avg_rejected.f_clamp_max(-1e-7)?);
            let log_odds = avg_chosen.f_sub(&avg_rejected)?.f_sub(&log1mexp(&c)?.f_sub(&log1mexp(&r)?)?)?;
            let odds_term = log_odds.f_log_sigmoid()?.f_mul_scalar(p.orpo_alpha)?;
            let loss = avg_chosen.f_neg()?.f_sub(&odds_term)?;
            (loss, avg_chosen.f_mul_scalar(p.orpo_alpha)?, avg_rejected.f_mul_scalar(p.orpo_alpha)?)
        }
    };
    let loss = if p.sft_weight > 0.0 { loss.f_sub(&avg_chosen.f_mul_scalar(p.sft_weight)?)? } else { loss };
    Ok(DpoLossOutput {
        loss,
        chosen_rewards: chosen_rewards.f_detach()?,
        rejected_rewards: rejected_rewards.f_detach()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use tch::Kind;

    fn fixture() -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dpo_losses.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn tensor(v: &Value) -> Tensor {
        let xs: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        Tensor::from_slice(&xs)
    }

    fn assert_close(got: &Tensor, want: &Value, tol: f64, what: &str) {
        let got: Vec<f64> = Vec::try_from(got.to_kind(Kind::Double)).unwrap();
        let want: Vec<f64> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: got {g}, TRL {w}");
        }
    }

    #[test]
    fn every_loss_matches_trl_reference_values() {
        let f = fixture();
        let inp = &f["inputs"];
        let t = |k: &str| tensor(&inp[k]);
        let (pc, pr, rc, rr, nc, nr) = (
            t("policy_chosen_logps"),
            t("policy_rejected_logps"),
            t("ref_chosen_logps"),
            t("ref_rejected_logps"),
            t("chosen_tokens"),
            t("rejected_tokens"),
        );
        let cases = f["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let params: DpoLossParams = {
                let p = &case["params"];
                DpoLossParams {
                    loss: serde_json::from_value(p["loss"].clone()).unwrap(),
                    beta: p["beta"].as_f64().unwrap(),
                    label_smoothing: p["label_smoothing"].as_f64().unwrap(),
                    simpo_gamma: p["simpo_gamma"].as_f64().unwrap(),
                    orpo_alpha: p["orpo_alpha"].as_f64().unwrap(),
                    sft_weight: p["sft_weight"].as_f64().unwrap(),
                }
            };
            params.validate().unwrap();
            let reference_free = !params.loss.needs_reference();
            let x = PairLogps {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                // reference-free losses must not need (or read) the reference
                ref_chosen_logps: (!reference_free).then_some(&rc),
                ref_rejected_logps: (!reference_free).then_some(&rr),
                chosen_tokens: &nc,
                rejected_tokens: &nr,
            };
            let out = dpo_loss(&x, &params).unwrap();
            // TRL computes ORPO's odds ratio in float32
            let tol = if params.loss == DpoLossType::Orpo { 1e-6 } else { 1e-9 };
            assert_close(&out.loss, &case["loss"], tol, &format!("{name} loss"));
            assert_close(&out.chosen_rewards, &case["chosen_rewards"], tol, &format!("{name} chosen_rewards"));
            assert_close(&out.rejected_rewards, &case["rejected_rewards"], tol, &format!("{name} rejected_rewards"));
        }
    }

    #[test]
    fn sigmoid_loss_is_ln2_when_policy_equals_reference() {
        let logps = Tensor::from_slice(&[-12.5f32, -3.0, -40.25]);
        let other = Tensor::from_slice(&[-7.0f32, -9.5, -1.0]);
        let n = Tensor::from_slice(&[5f32, 3.0, 20.0]);
        for eps in [0.0, 0.2] {
            let x = PairLogps {
                policy_chosen_logps: &logps,
                policy_rejected_logps: &other,
                ref_chosen_logps: Some(&logps),
                ref_rejected_logps: Some(&other),
                chosen_tokens: &n,
                rejected_tokens: &n,
            };
            let p = DpoLossParams { label_smoothing: eps, ..Default::default() };
            let out = dpo_loss(&x, &p).unwrap();
            let l: Vec<f32> = Vec::try_from(&out.loss).unwrap();
            for v in l {
                assert!((f64::from(v) - std::f64::consts::LN_2).abs() < 1e-6, "{v}");
            }
            assert_eq!(out.chosen_rewards.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }

    #[test]
    fn gradients_flow_to_the_policy_only_and_misuse_is_an_error() {
        let pc = Tensor::from_slice(&[-5.0f32, -6.0]).set_requires_grad(true);
        let pr = Tensor::from_slice(&[-5.5f32, -4.0]).set_requires_grad(true);
        let r = Tensor::from_slice(&[-5.0f32, -5.0]);
        let n = Tensor::from_slice(&[4f32, 4.0]);
        let x = PairLogps {
            policy_chosen_logps: &pc,
            policy_rejected_logps: &pr,
            ref_chosen_logps: Some(&r),
            ref_rejected_logps: Some(&r),
            chosen_tokens: &n,
            rejected_tokens: &n,
        };
        let out = dpo_loss(&x, &DpoLossParams::default()).unwrap();
        out.loss.sum(Kind::Float).backward();
        // raising the chosen log-prob lowers the loss
        assert!(pc.grad().double_value(&[0]) < 0.0 && pr.grad().double_value(&[0]) > 0.0);
        assert!(!out.chosen_rewards.requires_grad());
        let no_ref = PairLogps { ref_chosen_logps: None, ref_rejected_logps: None, ..x };
        let e = dpo_loss(&no_ref, &DpoLossParams::default()).err().unwrap().to_string();
        assert!(e.contains("reference"), "{e}");
        let bad = DpoLossParams { loss: DpoLossType::Hinge, label_smoothing: 0.1, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("label_smoothing"));
        assert!(DpoLossParams { beta: 0.0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn log1mexp_is_accurate_on_both_branches() {
        let x = Tensor::from_slice(&[-1e-6f64, -0.1, -0.69, -0.7, -5.0, -40.0]);
        let got: Vec<f64> = Vec::try_from(log1mexp(&x).unwrap()).unwrap();
        for (g, xv) in got.iter().zip([-1e-6f64, -0.1, -0.69, -0.7, -5.0, -40.0]) {
            let want = (-(xv.exp_m1())).ln();
            assert!((g - want).abs() < 1e-12 * want.abs().max(1.0), "{xv}: {g} vs {want}");
        }
    }
}
