//! SFT in half precision on CPU (`train.dtype = "f16"`): the loss stays finite, the float16
//! weights train through f32 master copies, every checkpoint is a float16 HF folder that loads
//! back as it was saved, and stop + resume reproduces the straight run bitwise.
use std::path::Path;

use align_core::train::config::LoadedConfig;
use align_testkit::{losses, rng_lock, same_bytes, sample_data, stage_config, tiny_model};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn config(out: &Path) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 4\nbatch_size = 4\nlr = 1e-3\nmax_length = 96\nsave_every = 2\ndtype = \"f16\"\n",
        tiny_model("tiny-llama"),
        sample_data("sft/medical_sharegpt.jsonl"),
        out
    );
    stage_config(&text, "sft", &[])
}

#[test]
fn f16_sft_trains_saves_float16_folders_and_resumes_exactly() {
    let _turn = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let summary = align_sft::run(&config(&straight), false, None).unwrap();
    assert!(summary.completed && summary.nonfinite_steps == 0, "{summary:?}");
    let l = losses(&straight);
    assert_eq!(l.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(l.iter().all(|(_, x)| x.is_finite() && *x > 0.0), "{l:?}");

    let base = align_core::load_causal_lm(&tiny_model("tiny-llama"), Device::Cpu, Kind::Half).unwrap();
    let base_vars = base.vs.variables();
    for dir in ["checkpoint-2", "final"] {
        let d = straight.join(dir);
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        let dtype = cfg.get("torch_dtype").or_else(|| cfg.get("dtype"));
        assert_eq!(dtype.and_then(Value::as_str), Some("float16"), "{dir}: config.json");
        let saved = Tensor::read_safetensors(d.join("model.safetensors")).unwrap();
        assert!(saved.iter().all(|(_, t)| t.kind() == Kind::Half), "{dir}: a tensor is not float16");
        // the folder loads back (in the dtype its config names) with exactly the saved weights
        let back = align_core::load_causal_lm(&d, Device::Cpu, Kind::Half).unwrap();
        let vars = back.vs.variables();
        for (name, t) in &saved {
            assert!(vars[name].equal(t), "{dir}: {name} differs after loading");
        }
        // training moved the weights away from the base's
        let moved = saved.iter().filter(|(name, t)| !t.equal(&base_vars[name])).count();
        assert!(moved > saved.len() / 2, "{dir}: only {moved} of {} tensors changed", saved.len());
        let ids = Tensor::from_slice(&[5i64, 17, 33, 200, 41]).view([1, 5]);
        let logits = tch::no_grad(|| back.lm.forward(&ids, &Default::default(), None)).unwrap();
        assert_eq!(logits.kind(), Kind::Half);
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{dir}: non-finite logits");
    }
    // the optimizer updated f32 master copies of the f16 weights
    let state = Tensor::read_safetensors(straight.join("checkpoint-4/train_state/optimizer.safetensors")).unwrap();
    let weights = Tensor::read_safetensors(straight.join("final/model.safetensors")).unwrap();
    for (name, w) in &weights {
        let master = state.iter().find(|(n, _)| *n == format!("master.{name}"));
        let (_, master) = master.unwrap_or_else(|| panic!("no f32 master copy of {name}"));
        assert_eq!(master.kind(), Kind::Float, "{name}");
        assert!(master.to_kind(Kind::Half).equal(w), "{name}: the f16 weight is not its master copy rounded");
    }

    let resumed = tmp.path().join("resumed");
    align_sft::run(&config(&resumed), false, Some(2)).unwrap();
    assert!(!resumed.join("final").exists());
    align_sft::run(&config(&resumed), false, None).unwrap();
    assert!(
        same_bytes(&straight.join("final/model.safetensors"), &resumed.join("final/model.safetensors")),
        "f16 weights differ after stop + resume"
    );
    assert_eq!(losses(&straight), losses(&resumed));
}
