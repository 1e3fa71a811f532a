//! The KTO loss (Kahneman–Tversky optimisation, TRL's `loss_type = "kto"`) as a pure function of
//! per-example log-prob tensors: each completion's implied reward against a KL reference point
//! estimated from mismatched completions of the same batch; it knows nothing of models or batches.
use anyhow::{bail, ensure, Result};
use tch::{Kind, Tensor};

/// The numbers the KTO loss depends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoLossParams {
    /// β: how far the policy may move from the reference.
    pub beta: f64,
    /// λ_D, the weight of a desirable example's loss.
    pub desirable_weight: f64,
    /// λ_U, the weight of an undesirable example's loss.
    pub undesirable_weight: f64,
}

impl Default for KtoLossParams {
    fn default() -> Self {
        KtoLossParams { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

impl KtoLossParams {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if !self.beta.is_finite() || self.beta <= 0.0 {
            bail!("'beta': expected a positive number, found {}", self.beta);
        }
        for (key, w) in [("desirable_weight", self.desirable_weight), ("undesirable_weight", self.undesirable_weight)] {
            if !w.is_finite() || w <= 0.0 {
                bail!("'{key}': expected a positive number, found {w}");
            }
        }
        Ok(())
    }
}

/// Per-example inputs, each `[B]`: log-probs SUMMED over the completion tokens, of the
/// example's own completion and of its mismatched (KL) completion, under the policy and the
/// reference; `desirable` is a `[B]` bool tensor (true = desirable).
pub struct KtoLogps<'a> {
    pub policy_logps: &'a Tensor,
    pub ref_logps: &'a Tensor,
    pub policy_kl_logps: &'a Tensor,
    pub ref_kl_logps: &'a Tensor,
    pub desirable: &'a Tensor,
}

/// The KTO loss's result.
pub struct KtoLossOutput {
    /// `[B]` weighted loss of each example, in the batch's order (the objective is their mean).
    pub loss: Tensor,
    /// `[B]` implied rewards β·(log π − log π_ref), detached (TRL's `rewards/chosen` over the
    /// desirable examples, `rewards/rejected` over the undesirable ones).
    pub rewards: Tensor,
    /// The KL reference point z0 = max(0, mean(log π(KL) − log π_ref(KL))), a detached scalar.
    pub kl: Tensor,
}

/// With r = log π − log π_ref of an example and z0 as in [`KtoLossOutput::kl`]:
/// a desirable example's loss is λ_D·(1 − σ(β·(r − z0))), an undesirable one's
/// λ_U·(1 − σ(β·(z0 − r))). `kl_mean`: the mean log-ratio of the KL completions when it is
/// taken over more than this batch (the micro-batches of every rank, as TRL gathers it before
/// the mean); None: over this batch's. z0 is its clamp at 0 either way.
pub fn kto_loss(x: &KtoLogps, p: &KtoLossParams, kl_mean: Option<f64>) -> Result<KtoLossOutput> {
    let n = x.policy_logps.size();
    ensure!(n.len() == 1 && n[0] > 0, "kto_loss: policy_logps has shape {n:?}; expected [B], B > 0");
    for (name, t) in [
        ("ref_logps", x.ref_logps),
        ("policy_kl_logps", x.policy_kl_logps),
        ("ref_kl_logps", x.ref_kl_logps),
        ("desirable", x.desirable),
    ] {
        ensure!(t.size() == n, "kto_loss: {name} has shape {:?}, policy_logps {n:?}", t.size());
    }
    ensure!(
        x.desirable.kind() == Kind::Bool,
        "kto_loss: desirable must be a bool tensor, found {:?}",
        x.desirable.kind()
    );
    let kl = match kl_mean {
        Some(m) => Tensor::from(m.max(0.0) as f32).f_to_device(x.policy_logps.device())?,
        None => x.policy_kl_logps.f_sub(x.ref_kl_logps)?.f_mean(Kind::Float)?.f_detach()?.f_clamp_min(0.0)?,
    };
    let logratio = x.policy_logps.f_sub(x.ref_logps)?;
    let beta = p.beta;
    let chosen = logratio.f_sub(&kl)?.f_mul_scalar(beta)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?;
    let rejected = kl.f_sub(&logratio)?.f_mul_scalar(beta)?.f_sigmoid()?.f_neg()?.f_add_scalar(1.0)?;
    let loss = chosen
        .f_mul_scalar(p.desirable_weight)?
        .f_where_self(x.desirable, &rejected.f_mul_scalar(p.undesirable_weight)?)?;
    Ok(KtoLossOutput { loss, rewards: logratio.f_detach()?.f_mul_scalar(beta)?, kl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture() -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kto_gkd_losses.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn tensor(v: &Value) -> Tensor {
        let xs: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        Tensor::from_slice(&xs)
    }

    /// Relative 1e-6 (the fixture holds 12 significant digits of float64 values).
    fn assert_close(got: &[f64], want: &Value, what: &str) {
        let want: Vec<f64> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-12), "{what}[{i}]: got {g}, TRL {w}");
        }
    }

    #[test]
    fn kto_loss_matches_trl() {
        let f = fixture();
        let cases = f["kto"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        let mut clamped = 0;
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let inp = &case["inputs"];
            let labels: Vec<bool> = inp["label"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
            let desirable = Tensor::from_slice(&labels);
            let t = |k: &str| tensor(&inp[k]);
            let (pl, rl, pk, rk) = (t("policy_logps"), t("ref_logps"), t("policy_KL_logps"), t("ref_KL_logps"));
            let p = &case["params"];
            let params = KtoLossParams {
                beta: p["beta"].as_f64().unwrap(),
                desirable_weight: p["desirable_weight"].as_f64().unwrap(),
                undesirable_weight: p["undesirable_weight"].as_f64().unwrap(),
            };
            params.validate().unwrap();
            let x = KtoLogps {
                policy_logps: &pl,
                ref_logps: &rl,
                policy_kl_logps: &pk,
                ref_kl_logps: &rk,
                desirable: &desirable,
            };
            let out = kto_loss(&x, &params, None).unwrap();
            let all = |t: &Tensor| -> Vec<f64> { Vec::try_from(t.to_kind(Kind::Double)).unwrap() };
            let (loss, rewards) = (all(&out.loss), all(&out.rewards));
            let pick = |v: &[f64], want: bool| -> Vec<f64> {
                v.iter().zip(&labels).filter(|(_, &l)| l == want).map(|(x, _)| *x).collect()
            };
            // TRL concatenates the desirable examples' losses, then the undesirable ones'
            let ordered: Vec<f64> = pick(&loss, true).into_iter().chain(pick(&loss, false)).collect();
            assert_close(&ordered, &case["losses"], &format!("{name} losses"));
            assert_close(&pick(&rewards, true), &case["chosen_rewards"], &format!("{name} chosen_rewards"));
            assert_close(&pick(&rewards, false), &case["rejected_rewards"], &format!("{name} rejected_rewards"));
            let kl = out.kl.double_value(&[]);
            let want = case["kl"].as_f64().unwrap();
            assert!((kl - want).abs() <= 1e-6 * want.abs(), "{name} kl: got {kl}, TRL {want}");
            clamped += usize::from(want == 0.0);
        }
        assert_eq!(clamped, 2, "the fixture covers a clamped z0");
    }

    #[test]
    fn gradients_raise_desirable_and_lower_undesirable_completions_and_skip_z0() {
        let pl = Tensor::from_slice(&[-5.0f32, -6.0]).set_requires_grad(true);
        let pk = Tensor::from_slice(&[-9.0f32, -8.0]).set_requires_grad(true);
        let r = Tensor::from_slice(&[-5.5f32, -5.5]);
        let rk = Tensor::from_slice(&[-10.0f32, -10.0]);
        let desirable = Tensor::from_slice(&[true, false]);
        let x = KtoLogps {
            policy_logps: &pl,
            ref_logps: &r,
            policy_kl_logps: &pk,
            ref_kl_logps: &rk,
            desirable: &desirable,
        };
        let out = kto_loss(&x, &KtoLossParams::default(), None).unwrap();
        out.loss.sum(Kind::Float).backward();
        assert!(pl.grad().double_value(&[0]) < 0.0 && pl.grad().double_value(&[1]) > 0.0);
        assert!(!pk.grad().defined() || pk.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0, "z0 is detached");
        assert!((out.kl.double_value(&[]) - 1.5).abs() < 1e-6);
        assert!(KtoLossParams { undesirable_weight: 0.0, ..Default::default() }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("'undesirable_weight'"));
    }

    /// A batch split in two with z0 from the KL completions of both halves (as two ranks
    /// all-reduce it) has the whole batch's losses.
    #[test]
    fn a_shared_kl_mean_gives_the_whole_batch_losses() {
        let t = |xs: &[f32]| Tensor::from_slice(xs);
        let (pl, r) = (t(&[-5.0, -6.0, -4.0, -7.0]), t(&[-5.5, -5.5, -4.2, -6.1]));
        let (pk, rk) = (t(&[-9.0, -8.0, -7.5, -9.5]), t(&[-10.0, -10.0, -8.0, -9.0]));
        let desirable = Tensor::from_slice(&[true, false, false, true]);
        let p = KtoLossParams::default();
        let x = |lo: i64, n: i64| -> KtoLossOutput {
            let (a, b, c, d, e) = (
                pl.narrow(0, lo, n),
                r.narrow(0, lo, n),
                pk.narrow(0, lo, n),
                rk.narrow(0, lo, n),
                desirable.narrow(0, lo, n),
            );
            let x = KtoLogps { policy_logps: &a, ref_logps: &b, policy_kl_logps: &c, ref_kl_logps: &d, desirable: &e };
            let mean = (&pk - &rk).sum(Kind::Double).double_value(&[]) / 4.0;
            kto_loss(&x, &p, (n < 4).then_some(mean)).unwrap()
        };
        let whole = x(0, 4);
        let halves = Tensor::cat(&[x(0, 2).loss, x(2, 2).loss], 0);
        assert!((&whole.loss - &halves).abs().max().double_value(&[]) < 1e-6);
        assert!((whole.kl.double_value(&[]) - 0.75).abs() < 1e-6);
    }
}
