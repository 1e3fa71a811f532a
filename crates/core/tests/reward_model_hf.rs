//! A reward model we save (trunk of a causal LM + `score.weight`) loads in transformers'
//! `AutoModelForSequenceClassification` with the same scores, for every family, with padding.
use std::path::{Path, PathBuf};

use align_core::model::scalar::{load_reward_model, scalar_model_from_causal_lm, write_scalar_model, ScoreInit};
use align_testkit::python_with;
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn saved_reward_model_loads_in_transformers_with_equal_scores() {
    let Some(python) = python_with(&["transformers"]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    // right-padded rows (pad id 0) of different lengths; one row contains no padding
    let rows: Vec<Vec<i64>> = vec![
        vec![1, 40, 41, 42, 2, 10, 0, 0, 0],
        vec![1, 50, 51, 52, 53, 54, 55, 2, 10],
        vec![7, 8, 0, 0, 0, 0, 0, 0, 0],
    ];
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    let ids = Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64]);
    for (i, name) in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"].iter().enumerate() {
        let src = fixtures().join("models").join(name);
        let m = scalar_model_from_causal_lm(&src, Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, i as u64))
            .unwrap();
        let out = tmp.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        write_scalar_model(&m.vs, &m.rm, &out, None, Some(&src)).unwrap();
        // scores of the folder as align loads it back
        let back = load_reward_model(&out, Device::Cpu, Kind::Float).unwrap();
        let scores: Vec<f32> = Vec::try_from(back.rm.forward(&ids).unwrap()).unwrap();
        assert!(scores.iter().any(|s| s.abs() > 1e-3), "{name}: scores are all ~0: {scores:?}");
        let file = tmp.path().join(format!("{name}.json"));
        std::fs::write(&file, json!({"input_ids": rows, "scores": scores}).to_string()).unwrap();
        let status = std::process::Command::new(&python)
            .arg(fixtures().join("check_reward_model.py"))
            .arg(&out)
            .arg(&file)
            .status()
            .unwrap();
        assert!(status.success(), "{name}: transformers does not reproduce the reward model's scores");
    }
}
