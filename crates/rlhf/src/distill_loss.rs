//! Distillation divergences between a student's and a teacher's next-token distributions, as
//! pure functions of their logits: the generalised Jensen–Shannon divergence of GKD (TRL's
//! `GKDTrainer.generalized_jsd_loss`), which is the forward KL at β = 0 and the reverse KL at
//! β = 1. They know nothing of models or batches.
use anyhow::{bail, ensure, Result};
use tch::{Kind, Tensor};

/// Checks β ∈ [0, 1] and a positive temperature; errors name the key.
pub fn validate_jsd(beta: f64, temperature: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&beta) {
        bail!("'beta': expected a number in [0, 1] (0 = forward KL, 1 = reverse KL), found {beta}");
    }
    if !temperature.is_finite() || temperature <= 0.0 {
        bail!("'temperature': expected a positive number, found {temperature}");
    }
    Ok(())
}

/// The generalised JSD of each position, `[N]` (f32; f64 for f64 logits), from `[N, V]` student and teacher logits
/// (both divided by `temperature` first), with s = log softmax(student), t = log softmax(teacher):
/// β = 0: KL(teacher ‖ student) = Σ e^t (t − s); β = 1: KL(student ‖ teacher) = Σ e^s (s − t);
/// else, with the mixture m = log((1−β) e^s + β e^t): β·KL(teacher ‖ m) + (1−β)·KL(student ‖ m).
/// Gradients flow into the student's logits (the teacher's are taken as given).
pub fn generalized_jsd(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    beta: f64,
    temperature: f64,
) -> Result<Tensor> {
    let (ss, ts) = (student_logits.size(), teacher_logits.size());
    ensure!(ss.len() == 2 && ss == ts, "generalized_jsd: student logits {ss:?} and teacher logits {ts:?} differ");
    validate_jsd(beta, temperature)?;
    let kind = if student_logits.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let log_softmax = |z: &Tensor| -> Result<Tensor> {
        let z = z.f_to_kind(kind)?;
        let z = if temperature != 1.0 { z.f_div_scalar(temperature)? } else { z };
        Ok(z.f_log_softmax(-1, kind)?)
    };
    let s = log_softmax(student_logits)?;
    let t = log_softmax(&teacher_logits.f_detach()?)?;
    // Σ_v e^a (a − b): KL(a ‖ b) of log-distributions a, b
    let kl = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        Ok(a.f_exp()?.f_mul(&a.f_sub(b)?)?.f_sum_dim_intlist(-1, false, kind)?)
    };
    if beta == 0.0 {
        return kl(&t, &s);
    }
    if beta == 1.0 {
        return kl(&s, &t);
    }
    let m = Tensor::f_stack(&[s.f_add_scalar((-beta).ln_1p())?, t.f_add_scalar(beta.ln())?], 0)?
        .f_logsumexp(&[0], false)?;
    Ok(kl(&t, &m)?.f_mul_scalar(beta)?.f_add(&kl(&s, &m)?.f_mul_scalar(1.0 - beta)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture() -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kto_gkd_losses.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn matrix(v: &Value, vocab: i64) -> Tensor {
        let xs: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        Tensor::from_slice(&xs).view([-1, vocab])
    }

    /// Float64 logits, as TRL was given; 1e-6 relative (the fixture holds 12 significant digits).
    #[test]
    fn generalized_jsd_matches_trl() {
        let f = fixture();
        let g = &f["gkd"];
        let vocab = g["vocab"].as_i64().unwrap();
        let (student, teacher) = (matrix(&g["student_logits"], vocab), matrix(&g["teacher_logits"], vocab));
        let cases = g["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 8);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let (beta, temperature) = (case["beta"].as_f64().unwrap(), case["temperature"].as_f64().unwrap());
            let got: Vec<f64> =
                Vec::try_from(generalized_jsd(&student, &teacher, beta, temperature).unwrap().to_kind(Kind::Double))
                    .unwrap();
            let want: Vec<f64> = case["per_token"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs(), "{name} [{i}]: got {a}, TRL {b}");
            }
            // TRL's loss ("batchmean" with labels) is the mean over the scored positions
            let mean = got.iter().sum::<f64>() / got.len() as f64;
            let want_mean = case["batchmean"].as_f64().unwrap();
            assert!((mean - want_mean).abs() <= 1e-6 * want_mean.abs(), "{name} batchmean: {mean} vs {want_mean}");
        }
    }

    #[test]
    fn divergence_is_zero_for_equal_distributions_and_trains_the_student_only() {
        let z = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, 0.0, 0.0]).view([2, 3]);
        for beta in [0.0, 0.3, 1.0] {
            let d = generalized_jsd(&z, &z, beta, 0.8).unwrap();
            assert!(d.abs().max().double_value(&[]) < 1e-6, "beta {beta}");
        }
        let s = Tensor::from_slice(&[0.0f32, 1.0, 2.0]).view([1, 3]).set_requires_grad(true);
        let t = Tensor::from_slice(&[2.0f32, 1.0, 0.0]).view([1, 3]).set_requires_grad(true);
        let d = generalized_jsd(&s, &t, 0.5, 1.0).unwrap();
        assert!(d.double_value(&[0]) > 0.0);
        d.sum(Kind::Float).backward();
        assert!(s.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(!t.grad().defined(), "no gradient reaches the teacher");
        assert!(validate_jsd(1.5, 1.0).unwrap_err().to_string().contains("'beta'"));
        assert!(validate_jsd(0.5, 0.0).unwrap_err().to_string().contains("'temperature'"));
    }
}
