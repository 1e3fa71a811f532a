//! The reward model's Bradley–Terry loss on a pair's two scores, with TRL's optional margin and
//! reward-centring term, as a pure function of tensors.
use anyhow::{ensure, Result};
use tch::Tensor;

/// Per-pair loss `−log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)²`, `[B]`.
/// The centring term (TRL's `center_rewards_coefficient`, mean over the batch there) pulls the
/// scores towards zero mean; it is per pair here, so the batch mean is the same.
pub fn bradley_terry_loss(
    chosen_rewards: &Tensor,
    rejected_rewards: &Tensor,
    margin: f64,
    center_rewards_coefficient: f64,
) -> Result<Tensor> {
    ensure!(
        chosen_rewards.size() == rejected_rewards.size(),
        "bradley_terry_loss: chosen {:?} and rejected {:?} rewards differ in shape",
        chosen_rewards.size(),
        rejected_rewards.size()
    );
    let loss = chosen_rewards.f_sub(rejected_rewards)?.f_sub_scalar(margin)?.f_log_sigmoid()?.f_neg()?;
    if center_rewards_coefficient == 0.0 {
        return Ok(loss);
    }
    let center = chosen_rewards.f_add(rejected_rewards)?.f_square()?.f_mul_scalar(center_rewards_coefficient)?;
    Ok(loss.f_add(&center)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    #[test]
    fn matches_trl_reward_trainer_values() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dpo_losses.json");
        let f: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let bt = &f["bradley_terry"];
        let rc = Tensor::from_slice(&floats(&bt["chosen_rewards"]));
        let rr = Tensor::from_slice(&floats(&bt["rejected_rewards"]));
        for case in bt["cases"].as_array().unwrap() {
            let margin = case["margin"].as_f64().unwrap();
            let center = case["center_rewards_coefficient"].as_f64().unwrap();
            let got: Vec<f64> = Vec::try_from(bradley_terry_loss(&rc, &rr, margin, center).unwrap()).unwrap();
            for (g, w) in got.iter().zip(floats(&case["loss"])) {
                assert!((g - w).abs() < 1e-9 * w.abs().max(1.0), "margin {margin} center {center}: {g} vs TRL {w}");
            }
        }
        // equal scores: ln 2
        let z = Tensor::from_slice(&[0.7f32]);
        let l = bradley_terry_loss(&z, &z, 0.0, 0.0).unwrap().double_value(&[0]);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-6);
    }
}
