//! Early stopping keeps the best evaluation's weights as `best/` and names its step; `final/`
//! stays the last step's weights. `best/` equals a straight run stopped at the best step
//! (bitwise: the same kernels in the same order).
use std::path::Path;

use align_core::train::config::LoadedConfig;
use align_testkit::{same_bytes, sample_data, stage_config, tiny_model};

fn config(out: &Path, extra: &[&str]) -> LoadedConfig {
    // a learning rate far too high: the eval loss first falls, then stops falling (with patience 1
    // one evaluation that is not better than the best stops the run)
    let text = format!(
        "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 40\nbatch_size = 4\nlr = 0.3\nschedule = \"constant\"\nmax_length = 32\nsave_every = 0\nval_ratio = 0.1\neval_every = 1\n",
        tiny_model("tiny-llama"),
        sample_data("pretrain/medical_corpus.txt"),
        out
    );
    stage_config(&text, "pretrain", extra)
}

#[test]
fn early_stopping_keeps_the_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("early");
    let s = align_pretrain::run(&config(&out, &["train.early_stopping_patience=1"]), false, None).unwrap();
    assert!(s.completed, "{s:?}");
    assert!(s.stop_reason.starts_with("early stopping"), "{}", s.stop_reason);
    let best = s.best_step.expect("a best step");
    assert!(best < s.steps, "best step {best} should precede the stop at {}", s.steps);
    assert!(s.stop_reason.contains(&format!("best at step {best}")), "{}", s.stop_reason);
    assert_eq!(s.best_dir.as_deref(), Some(out.join("best").as_path()));
    assert!(s.best_eval_loss.unwrap() <= s.eval_loss.unwrap());

    // best/ is the model of step `best`: a straight run of `best` steps ends with the same weights
    let straight = tmp.path().join("straight");
    let max = format!("train.max_steps={best}");
    let s2 = align_pretrain::run(&config(&straight, &[&max]), false, None).unwrap();
    assert!(s2.completed && s2.steps == best);
    let best_weights = out.join("best/model.safetensors");
    assert!(
        same_bytes(&best_weights, &straight.join("final/model.safetensors")),
        "best/ differs from the weights of step {best}"
    );
    assert!(
        !same_bytes(&out.join("final/model.safetensors"), &best_weights),
        "final/ should hold the last step's weights, not the best"
    );
    // best/ is a loadable HF folder
    assert!(out.join("best/config.json").is_file());
    // without early stopping there is no best/
    assert!(!straight.join("best").exists());
}
