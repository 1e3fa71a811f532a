//! (IA)³: PEFT-written folders reproduce PEFT's logits, merge exactly, disable to the base; our
//! folders load in PEFT with equal logits; only the vectors train (checkpointing gives the same
//! gradients); bad folders and options fail with one clear error. Fixtures:
//! `tests/fixtures/make_ia3_fixtures.py`.
use std::path::{Path, PathBuf};
use std::process::Command;

use align_core::model::decoder::ForwardOptions;
use align_core::model::io::{load_causal_lm, LoadedModel};
use align_core::model::lora_layer::LoraTargets;
use align_core::peft::ia3::{attach_ia3, load_ia3_adapter, merge_ia3, save_ia3_adapter, Ia3Config};
use align_core::peft::lora::{restore_adapter_weights, trainable_parameters, without_adapters, AdapterSaveOptions};
use align_core::CausalLm;
use align_testkit::python_with;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("peft").join(name)
}

fn tensor(file: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(file).unwrap().into_iter().find(|(n, _)| n == name).unwrap().1
}

fn load(name: &str) -> LoadedModel {
    load_causal_lm(&model_dir(name), Device::Cpu, Kind::Float).unwrap()
}

fn logits(lm: &CausalLm, ids: &Tensor) -> Tensor {
    tch::no_grad(|| lm.forward(ids, &ForwardOptions::default(), None)).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    ((a - b).abs() / b.abs().clamp_min(1.0)).max().double_value(&[])
}

const PEFT_FOLDERS: &[(&str, &str, usize)] = &[("llama-ia3", "tiny-llama", 6), ("qwen2-ia3", "tiny-qwen2", 8)];

#[test]
fn peft_ia3_folders_reproduce_peft_logits_merge_exactly_and_disable_to_the_base() {
    for (folder, base, vectors) in PEFT_FOLDERS {
        let golden = adapter_dir(folder).join("golden.safetensors");
        let ids = tensor(&golden, "input_ids");
        let mut m = load(base);
        let plain = logits(&m.lm, &ids);
        load_ia3_adapter(&m.vs, &mut m.lm, &adapter_dir(folder), false).unwrap();
        let n = m.vs.variables().keys().filter(|k| k.ends_with(".ia3_l")).count();
        assert_eq!(n, *vectors, "{folder}");
        let with = logits(&m.lm, &ids);
        let d = max_rel_diff(&with, &tensor(&golden, "logits"));
        assert!(d <= 1e-4, "{folder}: max relative logit difference to PEFT {d}");
        assert!(max_rel_diff(&with, &plain) > 0.05, "{folder}: the vectors should change the logits");
        let off = without_adapters(&m.lm, |lm| Ok(logits(lm, &ids))).unwrap();
        assert!(off.equal(&plain), "{folder}: with adapters disabled the base model's logits");
        assert!(trainable_parameters(&m.vs).is_empty(), "{folder}: loaded frozen");
        merge_ia3(&m.vs, &mut m.lm).unwrap();
        assert!(m.lm.model.ia3_config().is_none());
        assert!(!m.vs.variables().keys().any(|k| k.ends_with(".ia3_l")), "{folder}: merged vectors are gone");
        let d = max_rel_diff(&logits(&m.lm, &ids), &with);
        assert!(d <= 1e-5, "{folder}: merged logits differ from unmerged by {d}");
    }
}

/// Runs `make_peft_fixtures.py check` (any PEFT folder) on ours; skipped without PEFT.
fn peft_check(name: &str, adapter: &Path, golden: &Path) {
    let Some(python) = python_with(&["transformers", "peft"]) else {
        eprintln!("skipping the PEFT check of '{name}': no python with transformers and peft");
        return;
    };
    let out = Command::new(python)
        .arg(fixtures().join("make_peft_fixtures.py"))
        .args(["check", adapter.to_str().unwrap(), golden.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name}: PEFT does not reproduce our logits:\n{text}");
}

fn randomise(m: &LoadedModel, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (name, v) in m.vs.variables() {
            if name.ends_with(".ia3_l") {
                let r = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.3 + 1.0;
                let _ = v.shallow_clone().copy_(&r);
            }
        }
    });
}

#[test]
fn our_ia3_adapters_round_trip_restore_and_load_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str, Ia3Config, Vec<&str>)> = vec![
        ("llama-default", "tiny-llama", Ia3Config::default(), vec!["down_proj", "k_proj", "v_proj"]),
        (
            "qwen2-listed",
            "tiny-qwen2",
            Ia3Config {
                target_modules: Some(LoraTargets::names(&["k_proj", "o_proj", "gate_proj", "down_proj"])),
                feedforward_modules: Some(LoraTargets::names(&["gate_proj", "down_proj"])),
            },
            vec!["down_proj", "gate_proj", "k_proj", "o_proj"],
        ),
    ];
    for (name, base, cfg, targets) in cases {
        let ids = tensor(&model_dir(base).join("golden.safetensors"), "input_ids");
        let mut m = load(base);
        let used = attach_ia3(&m.vs, &mut m.lm, &cfg).unwrap();
        let plain = logits(&m.lm, &ids);
        let base_logits = load(base);
        assert!(plain.equal(&logits(&base_logits.lm, &ids)), "{name}: vectors of ones are the base model");
        randomise(&m, 3);
        let ours = logits(&m.lm, &ids);
        let out = tmp.path().join(name);
        let opts = AdapterSaveOptions {
            base_model_name_or_path: Some(model_dir(base).display().to_string()),
            companions_from: None,
        };
        save_ia3_adapter(&m.lm, &out, &opts).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(json["peft_type"], "IA3");
        let mut listed: Vec<String> =
            json["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        listed.sort();
        assert_eq!(listed, targets, "{name}");
        let mut again = load(base);
        let read = load_ia3_adapter(&again.vs, &mut again.lm, &out, true).unwrap();
        assert_eq!(read, used, "{name}: the configuration survives the folder");
        assert!(logits(&again.lm, &ids).equal(&ours), "{name}: reloaded, the same logits");
        // a checkpoint restores into freshly attached vectors
        let mut fresh = load(base);
        attach_ia3(&fresh.vs, &mut fresh.lm, &cfg).unwrap();
        restore_adapter_weights(&fresh.vs, &out).unwrap();
        assert!(logits(&fresh.lm, &ids).equal(&ours), "{name}: restored, the same logits");
        let golden = tmp.path().join(format!("{name}-golden.safetensors"));
        Tensor::write_safetensors(&[("input_ids", &ids), ("logits", &ours)], &golden).unwrap();
        peft_check(name, &out, &golden);
    }
}

#[test]
fn only_the_vectors_train_and_checkpointing_gives_the_same_gradients() {
    let ids = tensor(&model_dir("tiny-llama").join("golden.safetensors"), "input_ids");
    let mut m = load("tiny-llama");
    attach_ia3(&m.vs, &mut m.lm, &Ia3Config::default()).unwrap();
    randomise(&m, 4);
    m.lm.set_training(true);
    let names: Vec<String> = trainable_parameters(&m.vs).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 6);
    assert!(names.iter().all(|n| n.ends_with(".ia3_l")), "{names:?}");
    let grads = |m: &LoadedModel| {
        let params = trainable_parameters(&m.vs);
        for (_, p) in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let t = ids.size()[1];
        let l = m.lm.forward(&ids, &ForwardOptions::default(), None).unwrap();
        let loss = l
            .narrow(1, 0, t - 1)
            .reshape([-1, l.size()[2]])
            .cross_entropy_for_logits(&ids.narrow(1, 1, t - 1).reshape([-1]));
        align_core::model::recompute::backward(&loss).unwrap();
        params.into_iter().map(|(n, p)| (n, p.grad().copy())).collect::<Vec<_>>()
    };
    let plain = grads(&m);
    for (n, g) in &plain {
        assert!(g.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{n} receives a gradient");
    }
    m.lm.model.set_gradient_checkpointing(1);
    let checkpointed = grads(&m);
    for ((n, a), (_, b)) in plain.iter().zip(&checkpointed) {
        assert!(a.equal(b), "{n}: checkpointed gradient differs");
    }
}

fn edited(tmp: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(adapter_dir("llama-ia3").join(f), dir.join(f)).unwrap();
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
    dir
}

#[test]
fn bad_ia3_folders_and_options_fail_with_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Box<dyn FnOnce(&mut serde_json::Value)>, &str)> = vec![
        ("fifo", Box::new(|v| v["fan_in_fan_out"] = true.into()), "field 'fan_in_fan_out'"),
        ("mts", Box::new(|v| v["modules_to_save"] = serde_json::json!(["lm_head"])), "field 'modules_to_save'"),
        ("ff", Box::new(|v| v["feedforward_modules"] = serde_json::json!([])), "expected module names"),
        ("shape", Box::new(|v| v["feedforward_modules"] = serde_json::json!(["k_proj"])), "has shape [1, 64]"),
        ("notarget", Box::new(|v| v["feedforward_modules"] = serde_json::json!(["up_proj"])), "feedforward_modules"),
        ("task", Box::new(|v| v["task_type"] = "SEQ_CLS".into()), "field 'task_type'"),
    ];
    for (name, edit, want) in cases {
        let dir = edited(tmp.path(), name, edit);
        let mut m = load("tiny-llama");
        let e = format!("{:#}", load_ia3_adapter(&m.vs, &mut m.lm, &dir, false).unwrap_err());
        assert!(e.contains(want) && e.contains("adapter_"), "{name}: {e}");
    }
    let mut m = load("tiny-llama");
    let e = attach_ia3(
        &m.vs,
        &mut m.lm,
        &Ia3Config {
            target_modules: Some(LoraTargets::names(&["q_proj"])),
            feedforward_modules: Some(LoraTargets::names(&["down_proj"])),
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("every feed-forward module must also be a target"), "{e:#}");
    attach_ia3(&m.vs, &mut m.lm, &Ia3Config::default()).unwrap();
    let e = attach_ia3(&m.vs, &mut m.lm, &Ia3Config::default()).unwrap_err().to_string();
    assert!(e.contains("already attached"), "{e}");
}
