//! The loop's guards, with a scripted toy step (one weight, scripted non-finite steps and eval
//! losses) so each case is exact: non-finite steps are skipped and logged, N in a row stop the
//! run, non-finite weights are never saved, and a NaN evaluation never disables early stopping.
use std::collections::BTreeMap;
use std::path::Path;

use align_core::hf::checkpoint::save_tensors;
use align_core::train::config::{RunFingerprint, TrainSection};
use align_core::train::optim::{AdamW, AdamWConfig};
use align_core::train::trainer::{
    clip_and_step, train, Evaluation, StepContext, StepReport, TrainRun, TrainStep, TrainSummary,
};
use anyhow::Result;
use serde_json::Value;
use tch::{Kind, Tensor};

struct Toy {
    w: Tensor,
    opt: AdamW,
    /// 1-based steps whose loss is NaN (the update is skipped).
    nan_steps: Vec<u64>,
    /// 1-based step after which the weight becomes inf.
    inf_after: Option<u64>,
    evals: Vec<f64>,
    evals_done: usize,
}

impl Toy {
    fn new(nan_steps: &[u64], inf_after: Option<u64>, evals: &[f64]) -> Self {
        let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
        let opt = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig::default()).unwrap();
        Toy { w, opt, nan_steps: nan_steps.to_vec(), inf_after, evals: evals.to_vec(), evals_done: 0 }
    }
}

impl TrainStep for Toy {
    fn examples(&self) -> usize {
        8
    }
    fn examples_per_step(&self) -> usize {
        1
    }
    fn step(&mut self, at: &StepContext) -> Result<StepReport> {
        let n = at.step + 1;
        if self.nan_steps.contains(&n) {
            return Ok(StepReport { loss: Some(f64::NAN), examples: 1, applied: false, ..Default::default() });
        }
        let loss = (&self.w * &self.w).sum(Kind::Float);
        let value = loss.double_value(&[]);
        loss.backward();
        let norm = self.opt.grad_norm()?;
        clip_and_step(&mut self.opt, norm, 1.0, 0.1)?;
        self.opt.zero_grad();
        if self.inf_after == Some(n) {
            tch::no_grad(|| {
                let _ = self.w.shallow_clone().fill_(f64::INFINITY);
            });
        }
        Ok(StepReport { loss: Some(value), examples: 1, applied: true, ..Default::default() })
    }
    fn optimizers(&self) -> Vec<(&'static str, &AdamW)> {
        vec![("optimizer", &self.opt)]
    }
    fn optimizers_mut(&mut self) -> Vec<(&'static str, &mut AdamW)> {
        vec![("optimizer", &mut self.opt)]
    }
    fn save(&self, dir: &Path) -> Result<()> {
        let t: BTreeMap<String, Tensor> = [("w".to_string(), self.w.detach())].into();
        save_tensors(&t, dir, None, usize::MAX).map(|_| ())
    }
    fn restore(&self, dir: &Path) -> Result<()> {
        let saved = Tensor::read_safetensors(dir.join("model.safetensors"))?;
        tch::no_grad(|| self.w.shallow_clone().copy_(&saved[0].1));
        Ok(())
    }
    fn has_validation(&self) -> bool {
        !self.evals.is_empty()
    }
    fn evaluate(&mut self) -> Result<Evaluation> {
        let loss = self.evals[self.evals_done.min(self.evals.len() - 1)];
        self.evals_done += 1;
        Ok((loss, BTreeMap::new()))
    }
}

fn run(out: &Path, settings: &TrainSection, step: &mut Toy) -> Result<TrainSummary> {
    let fingerprint = RunFingerprint::default();
    train(TrainRun { settings, output_dir: out, fingerprint: &fingerprint, restart: false, stop_after: None }, step)
}

fn metric_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn settings() -> TrainSection {
    TrainSection { max_steps: 8, save_every: 1, max_nonfinite_steps: 3, device: "cpu".into(), ..Default::default() }
}

#[test]
fn a_non_finite_step_is_skipped_and_logged_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run(tmp.path(), &settings(), &mut Toy::new(&[3], None, &[])).unwrap();
    assert!(s.completed && s.steps == 8 && s.nonfinite_steps == 1, "{s:?}");
    if cfg!(target_os = "linux") {
        // the summary reports the process's peak resident memory (libtorch alone is > 10 MB)
        assert!(s.peak_rss_bytes.is_some_and(|b| b > 10 << 20), "{s:?}");
    }
    let skipped: Vec<u64> = metric_lines(tmp.path())
        .iter()
        .filter(|l| l["skipped_nonfinite"] == true)
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, vec![3]);
}

#[test]
fn n_non_finite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let e = run(tmp.path(), &settings(), &mut Toy::new(&[3, 4, 5], None, &[])).unwrap_err().to_string();
    assert!(e.contains("3 non-finite steps in a row"), "{e}");
    assert!(tmp.path().join("checkpoint-4/COMPLETE").is_file());
    assert!(!tmp.path().join("checkpoint-5").exists() && !tmp.path().join("final").exists());
}

#[test]
fn non_finite_weights_are_never_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let e = run(tmp.path(), &settings(), &mut Toy::new(&[], Some(2), &[])).unwrap_err().to_string();
    assert!(e.contains("not finite") && e.contains("refusing to save"), "{e}");
    assert!(tmp.path().join("checkpoint-1/COMPLETE").is_file());
    assert!(!tmp.path().join("checkpoint-2").exists(), "the inf weights must not be saved");
}

#[test]
fn a_nan_first_evaluation_does_not_disable_early_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TrainSection { eval_every: 1, early_stopping_patience: 2, ..settings() };
    let summary = run(tmp.path(), &s, &mut Toy::new(&[], None, &[f64::NAN, 1.0, 2.0, 3.0, 4.0])).unwrap();
    assert!(summary.stop_reason.starts_with("early stopping"), "{summary:?}");
    assert_eq!((summary.steps, summary.best_step, summary.best_eval_loss), (4, Some(2), Some(1.0)), "{summary:?}");
    assert!(tmp.path().join("best/model.safetensors").is_file());
}
