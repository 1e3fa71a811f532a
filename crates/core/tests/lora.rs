//! LoRA and freezing: PEFT-written adapters reproduce PEFT's logits, our adapters load in PEFT,
//! merge / disable / rsLoRA / dropout behave, freezing selects the right parameters, and bad
//! adapters fail with one clear error. Fixtures: `tests/fixtures/make_peft_fixtures.py`.
use std::path::{Path, PathBuf};
use std::process::Command;

use align_core::hf::checkpoint::causal_lm_tensors;
use align_core::model::decoder::ForwardOptions;
use align_core::model::io::{load_causal_lm, LoadedModel};
use align_core::peft::lora::{
    apply_freeze, attach_lora, load_adapter, merge_lora, read_adapter_config, save_adapter, trainable_parameters,
    without_adapters, AdapterSaveOptions, FreezeConfig, LoraConfig, LoraInit, LoraTargets,
};
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

/// (adapter fixture, base model)
const PEFT_ADAPTERS: &[(&str, &str)] = &[
    ("llama-qv", "tiny-llama"),
    ("llama-all", "tiny-llama"),
    ("qwen2-all-rslora", "tiny-qwen2"),
    ("llama-dora", "tiny-llama"),
    ("qwen2-dora-qv", "tiny-qwen2"),
    ("llama-pissa", "tiny-llama"),
    ("llama-olora", "tiny-llama"),
    ("llama-patterns", "tiny-llama"),
];

#[test]
fn peft_adapters_reproduce_peft_logits() {
    for (adapter, base) in PEFT_ADAPTERS {
        let golden = adapter_dir(adapter).join("golden.safetensors");
        let ids = tensor(&golden, "input_ids");
        let mut m = load(base);
        let cfg = load_adapter(&m.vs, &mut m.lm, &adapter_dir(adapter)).unwrap();
        assert_eq!((cfg.r, cfg.alpha), (4, 8.0), "{adapter}");
        let d = max_rel_diff(&logits(&m.lm, &ids), &tensor(&golden, "logits"));
        assert!(d <= 1e-4, "{adapter}: max relative logit difference to PEFT {d}");
    }
}

#[test]
fn disabled_adapters_give_the_base_model_and_merge_equals_unmerged() {
    for (adapter, base) in PEFT_ADAPTERS {
        let base_golden = model_dir(base).join("golden.safetensors");
        let ids = tensor(&base_golden, "input_ids");
        let base_logits = tensor(&base_golden, "logits");
        let mut m = load(base);
        load_adapter(&m.vs, &mut m.lm, &adapter_dir(adapter)).unwrap();
        let with = logits(&m.lm, &ids);
        assert!(max_rel_diff(&with, &base_logits) > 0.1, "{adapter}: the adapter should change the logits");
        let without = without_adapters(&m.lm, |lm| Ok(logits(lm, &ids))).unwrap();
        assert!(max_rel_diff(&without, &base_logits) < 1e-4, "{adapter}: disabled adapters differ from the base");
        assert!(m.lm.adapters_enabled(), "without_adapters restores the state");
        m.lm.set_adapters_enabled(false);
        assert!(max_rel_diff(&logits(&m.lm, &ids), &base_logits) < 1e-4);
        m.lm.set_adapters_enabled(true);
        assert!(max_rel_diff(&logits(&m.lm, &ids), &with) == 0.0);

        merge_lora(&m.vs, &mut m.lm).unwrap();
        let merged = logits(&m.lm, &ids);
        let d = max_rel_diff(&merged, &with);
        assert!(d < 1e-4, "{adapter}: merged differs from unmerged by {d}");
        assert!(m.lm.lora_config().is_none());
        assert!(m.lm.linears().iter().all(|(_, l)| l.lora.is_none()));
        assert!(m.vs.variables().keys().all(|k| !k.contains("lora_")), "merge removes the adapter variables");
        assert!(causal_lm_tensors(&m.vs, &m.lm.config).keys().all(|k| !k.contains("lora_")));
    }
}

/// Gives every lora_B (zeros after attach) seeded random values so the adapter matters.
fn randomise_adapters(lm: &CausalLm, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (_, lin) in lm.linears() {
            if let Some(l) = &lin.lora {
                l.lora_b.shallow_clone().copy_(&(Tensor::randn(l.lora_b.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
}

#[test]
fn our_adapter_round_trips_and_loads_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny-llama");
    let ids = tensor(&base_dir.join("golden.safetensors"), "input_ids");
    for (name, cfg) in [
        (
            "qv",
            LoraConfig { r: 4, alpha: 8.0, targets: LoraTargets::names(&["q_proj", "v_proj"]), ..Default::default() },
        ),
        ("all-rslora", LoraConfig { r: 8, alpha: 4.0, use_rslora: true, ..Default::default() }),
        (
            "regex",
            LoraConfig {
                r: 4,
                alpha: 8.0,
                targets: LoraTargets::Pattern(r"model\.layers\.1\..*_proj".into()),
                ..Default::default()
            },
        ),
    ] {
        let mut m = load("tiny-llama");
        tch::manual_seed(3);
        let modules = attach_lora(&m.vs, &mut m.lm, &cfg).unwrap();
        assert_eq!(modules.len(), [("qv", 4), ("regex", 7)].iter().find(|c| c.0 == name).map_or(14, |c| c.1));
        // a fresh adapter (B = 0) leaves the model unchanged
        let base = tensor(&base_dir.join("golden.safetensors"), "logits");
        assert!(max_rel_diff(&logits(&m.lm, &ids), &base) < 1e-4);
        randomise_adapters(&m.lm, 5);
        let ours = logits(&m.lm, &ids);
        assert!(max_rel_diff(&ours, &base) > 0.1);

        let out = tmp.path().join(name);
        let opts = AdapterSaveOptions {
            base_model_name_or_path: Some(base_dir.to_string_lossy().into_owned()),
            companions_from: Some(&base_dir),
        };
        save_adapter(&m.lm, &out, &opts).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"] {
            assert!(out.join(f).is_file(), "{name}: {f} missing");
        }
        let keys: Vec<String> = Tensor::read_safetensors(out.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let layer = if name == "regex" { 1 } else { 0 };
        let q = format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight");
        assert!(keys.contains(&q), "{name}: {keys:?}");
        assert_eq!(keys.len(), 2 * modules.len(), "{name}: {keys:?}");
        let cfg_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg_json["peft_type"], "LORA");
        assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
        if name == "all-rslora" {
            let t: Vec<&str> =
                cfg_json["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(t, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]);
        }
        if name == "regex" {
            // PEFT takes a string target_modules as a regular expression: it is written as given
            assert_eq!(cfg_json["target_modules"], r"model\.layers\.1\..*_proj");
        }
        assert_eq!(read_adapter_config(&out).unwrap().use_rslora, cfg.use_rslora);

        // load into a fresh base (attach from the file) …
        let mut fresh = load("tiny-llama");
        let loaded = load_adapter(&fresh.vs, &mut fresh.lm, &out).unwrap();
        assert_eq!((loaded.r, loaded.alpha, loaded.use_rslora), (cfg.r, cfg.alpha, cfg.use_rslora));
        assert!(max_rel_diff(&logits(&fresh.lm, &ids), &ours) < 1e-6, "{name}: reload differs");
        // … and into one with adapters attached from the same config (resume)
        let mut resumed = load("tiny-llama");
        attach_lora(&resumed.vs, &mut resumed.lm, &cfg).unwrap();
        load_adapter(&resumed.vs, &mut resumed.lm, &out).unwrap();
        assert!(max_rel_diff(&logits(&resumed.lm, &ids), &ours) < 1e-6, "{name}: resume differs");

        let golden = tmp.path().join(format!("{name}-golden.safetensors"));
        Tensor::write_safetensors(&[("input_ids", &ids), ("logits", &ours)], &golden).unwrap();
        if let Some(python) = python_with(&["transformers", "peft"]) {
            let out = Command::new(python)
                .arg(fixtures().join("make_peft_fixtures.py"))
                .args(["check", out.to_str().unwrap(), golden.to_str().unwrap()])
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "{name}: PEFT does not reproduce our logits:\n{text}");
        }
    }
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    // the same adapter weights in both models, set by hand: no dependence on libtorch's global
    // random generator, which the tests of this file running in parallel threads share
    let x = Tensor::randn([2, 3, 32], (Kind::Float, Device::Cpu));
    let mut adapter: Option<(Tensor, Tensor)> = None;
    let mut deltas = Vec::new();
    for use_rslora in [false, true] {
        let mut m = load("tiny-llama");
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: LoraTargets::names(&["q_proj"]),
            use_rslora,
            ..Default::default()
        };
        attach_lora(&m.vs, &mut m.lm, &cfg).unwrap();
        let q = &m.lm.model.layers[0].self_attn.q_proj;
        let lora = q.lora.as_ref().unwrap();
        let (a, b) = adapter.get_or_insert_with(|| (lora.lora_a.randn_like() * 0.1, lora.lora_b.randn_like() * 0.1));
        tch::no_grad(|| {
            lora.lora_a.shallow_clone().copy_(a);
            lora.lora_b.shallow_clone().copy_(b);
        });
        let scaling = q.lora.as_ref().unwrap().scaling;
        assert_eq!(scaling, if use_rslora { 4.0 } else { 2.0 });
        let full = tch::no_grad(|| q.forward(&x)).unwrap();
        deltas.push(full - x.linear::<Tensor>(q.weight.dense().unwrap(), None));
    }
    let d = max_rel_diff(&(&deltas[0] * 2.0), &deltas[1]);
    assert!(d < 1e-5, "rsLoRA update should be twice the plain one for r = 4: {d}");
}

#[test]
fn lora_trains_only_adapters_and_dropout_is_training_only() {
    let mut m = load("tiny-llama");
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.5, ..Default::default() };
    attach_lora(&m.vs, &mut m.lm, &cfg).unwrap();
    let trainable = trainable_parameters(&m.vs);
    assert_eq!(trainable.len(), 2 * 14);
    assert!(trainable.iter().all(|(n, _)| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")));
    assert!(trainable.iter().any(|(n, _)| n == "model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(
        !m.lm.model.embed_tokens.requires_grad()
            && !m.lm.model.layers[1].mlp.up_proj.weight.dense().unwrap().requires_grad()
    );
    randomise_adapters(&m.lm, 1);
    let ids = Tensor::from_slice(&[5i64, 9, 200, 17, 3, 44]).view([1, 6]);

    // evaluation mode (the default): deterministic
    assert!(!m.lm.is_training());
    let a = logits(&m.lm, &ids);
    assert!(max_rel_diff(&logits(&m.lm, &ids), &a) == 0.0);
    // training mode: dropout on the adapter input makes two passes differ
    m.lm.set_training(true);
    let b = logits(&m.lm, &ids);
    let c = logits(&m.lm, &ids);
    assert!(max_rel_diff(&b, &c) > 1e-4, "dropout should act in training mode");
    // … but not with the adapters disabled
    m.lm.set_adapters_enabled(false);
    assert!(max_rel_diff(&logits(&m.lm, &ids), &logits(&m.lm, &ids)) == 0.0);
    m.lm.set_adapters_enabled(true);

    // gradients reach the adapters and only them
    let out = m.lm.forward(&ids, &ForwardOptions::default(), None).unwrap();
    out.sum(Kind::Float).backward();
    for (name, t) in &trainable {
        assert!(t.grad().defined(), "{name}: no gradient");
    }
    assert!(!m.lm.model.layers[0].self_attn.q_proj.weight.dense().unwrap().grad().defined());
}

#[test]
fn bf16_models_keep_f32_adapters() {
    let mut m = load_causal_lm(&model_dir("tiny-llama"), Device::Cpu, Kind::BFloat16).unwrap();
    load_adapter(&m.vs, &mut m.lm, &adapter_dir("llama-all")).unwrap();
    let q = &m.lm.model.layers[0].self_attn.q_proj;
    assert_eq!(q.lora.as_ref().unwrap().lora_a.kind(), Kind::Float);
    let golden = adapter_dir("llama-all").join("golden.safetensors");
    let got = logits(&m.lm, &tensor(&golden, "input_ids"));
    assert_eq!(got.kind(), Kind::BFloat16);
    let want = tensor(&golden, "logits");
    let agree = got.to_kind(Kind::Float).argmax(-1, false).eq_tensor(&want.argmax(-1, false)).to_kind(Kind::Float);
    assert!(agree.mean(Kind::Float).double_value(&[]) > 0.8, "bf16 + adapter far from PEFT's f32 logits");
}

#[test]
fn freeze_selects_last_layers_and_named_modules() {
    let m = load("tiny-llama");
    let names = apply_freeze(&m.vs, &m.lm, &FreezeConfig { last_layers: Some(1), modules: vec![] }).unwrap();
    assert_eq!(names.len(), 9, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("model.layers.1.")));
    let listed: Vec<String> = trainable_parameters(&m.vs).into_iter().map(|(n, _)| n).collect();
    assert_eq!(listed, names);
    assert!(!m.lm.model.embed_tokens.requires_grad());

    let names = apply_freeze(
        &m.vs,
        &m.lm,
        &FreezeConfig { last_layers: Some(1), modules: vec!["embed_tokens".into(), "norm".into()] },
    )
    .unwrap();
    // layer 1 (9) + embeddings + final norm + layer 0's two layernorms
    assert_eq!(names.len(), 9 + 1 + 1 + 2, "{names:?}");
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(names.contains(&"model.layers.0.input_layernorm.weight".to_string()));
    assert!(!names.contains(&"model.layers.0.mlp.up_proj.weight".to_string()));

    let names = apply_freeze(&m.vs, &m.lm, &FreezeConfig { last_layers: None, modules: vec!["mlp".into()] }).unwrap();
    assert_eq!(names.len(), 6);
    assert!(m.lm.model.layers[0].mlp.down_proj.weight.dense().unwrap().requires_grad());
    assert!(!m.lm.model.layers[0].self_attn.q_proj.weight.dense().unwrap().requires_grad());

    for (cfg, want) in [
        (FreezeConfig { last_layers: Some(3), modules: vec![] }, "freeze.last_layers"),
        (FreezeConfig { last_layers: Some(0), modules: vec![] }, "freeze.last_layers"),
        (FreezeConfig { last_layers: None, modules: vec!["attn.c_proj".into()] }, "'attn.c_proj' matches no parameter"),
        (FreezeConfig::default(), "nothing would be trained"),
    ] {
        let e = apply_freeze(&m.vs, &m.lm, &cfg).unwrap_err().to_string();
        assert!(e.contains(want), "{cfg:?}: {e}");
    }
    let mut l = load("tiny-llama");
    attach_lora(&l.vs, &mut l.lm, &LoraConfig::default()).unwrap();
    let e = apply_freeze(&l.vs, &l.lm, &FreezeConfig { last_layers: Some(1), modules: vec![] }).unwrap_err();
    assert!(e.to_string().contains("LoRA"), "{e}");
}

/// Copies a fixture adapter into `tmp` with its config edited by `edit`.
fn edited_adapter(tmp: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = adapter_dir("llama-qv");
    std::fs::copy(src.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    dir
}

fn load_error(base: &str, adapter: &Path) -> String {
    let mut m = load(base);
    let e = format!("{:#}", load_adapter(&m.vs, &mut m.lm, adapter).unwrap_err());
    assert!(!e.contains('\n'), "error should be one line: {e}");
    e
}

#[test]
fn bad_adapters_fail_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    // an adapter made on a base with other shapes (tiny-qwen3: head_dim 16, so k_proj has 32
    // outputs where tiny-llama's has 16)
    let mut q3 = load("tiny-qwen3");
    attach_lora(&q3.vs, &mut q3.lm, &LoraConfig { r: 4, alpha: 8.0, ..Default::default() }).unwrap();
    let wrong = tmp.path().join("qwen3-adapter");
    save_adapter(&q3.lm, &wrong, &AdapterSaveOptions::default()).unwrap();
    let e = load_error("tiny-llama", &wrong);
    assert!(e.contains("adapter_model.safetensors") && e.contains("k_proj.lora_B.weight"), "{e}");
    assert!(e.contains("[32, 4]") && e.contains("[16, 4]") && e.contains("different base model"), "{e}");

    // a PEFT adapter with the adapter name left in its keys still loads
    let named = tmp.path().join("named");
    std::fs::create_dir_all(&named).unwrap();
    std::fs::copy(adapter_dir("llama-qv").join("adapter_config.json"), named.join("adapter_config.json")).unwrap();
    let renamed: Vec<(String, Tensor)> =
        Tensor::read_safetensors(adapter_dir("llama-qv").join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n.replace(".weight", ".default.weight"), t))
            .collect();
    let refs: Vec<(&str, &Tensor)> = renamed.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, named.join("adapter_model.safetensors")).unwrap();
    let mut m = load("tiny-llama");
    load_adapter(&m.vs, &mut m.lm, &named).unwrap();

    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        // a DoRA config over plain LoRA weights: the magnitude vectors are missing
        ("dora", Box::new(|c| c["use_dora"] = true.into()), "q_proj.lora_magnitude_vector'"),
        ("dora-type", Box::new(|c| c["use_dora"] = "yes".into()), "field 'use_dora'"),
        ("pissa-niter", Box::new(|c| c["init_lora_weights"] = "pissa_niter_4".into()), "randomised SVD"),
        ("loftq", Box::new(|c| c["init_lora_weights"] = "loftq".into()), "field 'init_lora_weights'"),
        ("fan-in-fan-out", Box::new(|c| c["fan_in_fan_out"] = true.into()), "field 'fan_in_fan_out'"),
        ("layers-pattern", Box::new(|c| c["layers_pattern"] = "h".into()), "field 'layers_pattern'"),
        ("rank-pattern", Box::new(|c| c["rank_pattern"] = serde_json::json!({"q_proj": 0})), "'q_proj'"),
        ("layer-range", Box::new(|c| c["layers_to_transform"] = serde_json::json!([0, 7])), "layer 7 does not exist"),
        ("bias", Box::new(|c| c["bias"] = "all".into()), "field 'bias'"),
        ("prompt", Box::new(|c| c["peft_type"] = "PROMPT_TUNING".into()), "field 'peft_type'"),
        ("regex", Box::new(|c| c["target_modules"] = "(q_proj".into()), "not a valid regular expression"),
        // a string is a regular expression matched against whole module paths, as in PEFT
        (
            "regex-none",
            Box::new(|c| c["target_modules"] = "q_proj".into()),
            "regular expression \"q_proj\" matches no projection",
        ),
        (
            "lm-head",
            Box::new(|c| c["target_modules"] = serde_json::json!(["lm_head"])),
            "'lm_head' matches no projection",
        ),
        ("rank", Box::new(|c| c["r"] = 0.into()), "field 'r'"),
        // the weights hold only q and v: asking for k as well leaves tensors missing
        (
            "missing",
            Box::new(|c| c["target_modules"] = serde_json::json!(["q_proj", "k_proj", "v_proj"])),
            "lacks 4 tensor(s)",
        ),
        // the weights hold v as well: selecting only q leaves v unexpected
        (
            "extra",
            Box::new(|c| c["target_modules"] = serde_json::json!(["q_proj"])),
            "no adapted module 'model.layers.0.self_attn.v_proj'",
        ),
    ];
    for (name, edit, want) in cases {
        let dir = edited_adapter(tmp.path(), name, edit);
        let e = load_error("tiny-llama", &dir);
        assert!(e.contains(want), "{name}: {e}");
        assert!(e.contains(&dir.display().to_string()), "{name}: error should name the file: {e}");
    }

    // resuming with a different configuration
    let mut m = load("tiny-llama");
    attach_lora(
        &m.vs,
        &mut m.lm,
        &LoraConfig { r: 8, alpha: 8.0, targets: LoraTargets::names(&["q_proj", "v_proj"]), ..Default::default() },
    )
    .unwrap();
    let e = format!("{:#}", load_adapter(&m.vs, &mut m.lm, &adapter_dir("llama-qv")).unwrap_err());
    assert!(e.contains("field 'r'"), "{e}");
    let mut m = load("tiny-llama");
    attach_lora(&m.vs, &mut m.lm, &LoraConfig { r: 4, alpha: 8.0, ..Default::default() }).unwrap();
    let e = format!("{:#}", load_adapter(&m.vs, &mut m.lm, &adapter_dir("llama-qv")).unwrap_err());
    assert!(e.contains("field 'target_modules'"), "{e}");

    let e = load_error("tiny-llama", &tmp.path().join("nowhere"));
    assert!(e.contains("adapter_config.json"), "{e}");
    // attaching twice
    let mut m = load("tiny-llama");
    attach_lora(&m.vs, &mut m.lm, &LoraConfig::default()).unwrap();
    assert!(attach_lora(&m.vs, &mut m.lm, &LoraConfig::default())
        .unwrap_err()
        .to_string()
        .contains("already attached"));
}

/// Runs `make_peft_fixtures.py check` on our adapter folder; skipped without PEFT.
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

#[test]
fn lora_variants_attach_round_trip_merge_and_load_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny-llama");
    let ids = tensor(&base_dir.join("golden.safetensors"), "input_ids");
    let base = tensor(&base_dir.join("golden.safetensors"), "logits");
    let lora = |f: &dyn Fn(&mut LoraConfig)| {
        let mut c = LoraConfig { r: 4, alpha: 8.0, ..Default::default() };
        f(&mut c);
        c
    };
    let cases: Vec<(&str, LoraConfig, usize)> = vec![
        ("dora", lora(&|c| c.use_dora = true), 14 * 3),
        (
            "dora-qv-rslora",
            lora(&|c| {
                c.use_dora = true;
                c.use_rslora = true;
                c.targets = LoraTargets::names(&["q_proj", "v_proj"]);
            }),
            4 * 3,
        ),
        ("gaussian", lora(&|c| c.init_lora_weights = LoraInit::Gaussian), 14 * 2),
        ("pissa", lora(&|c| c.init_lora_weights = LoraInit::Pissa), 14 * 2),
        (
            "olora",
            lora(&|c| {
                c.init_lora_weights = LoraInit::Olora;
                c.targets = LoraTargets::names(&["q_proj", "down_proj"]);
            }),
            4 * 2,
        ),
        (
            "patterns",
            lora(&|c| {
                c.rank_pattern = [("q_proj".to_string(), 2), (r"mlp\.(up|down)_proj".to_string(), 6)].into();
                c.alpha_pattern = [("v_proj".to_string(), 32.0)].into();
                c.layers_to_transform = Some(vec![1]);
            }),
            7 * 2,
        ),
    ];
    for (name, cfg, keys) in cases {
        let mut m = load("tiny-llama");
        tch::manual_seed(3);
        attach_lora(&m.vs, &mut m.lm, &cfg).unwrap();
        // every initialisation starts from the base model's function
        let d = max_rel_diff(&logits(&m.lm, &ids), &base);
        assert!(d < 1e-4, "{name}: a fresh adapter changes the logits by {d}");
        if cfg.init_lora_weights.mutates_base() {
            // the base holds residuals; with the adapters disabled the layer adds the initial
            // adapter back: the reference of DPO/PPO is the model as loaded
            let changed = m.lm.linears().iter().filter(|(_, l)| l.lora.is_some()).all(|(_, l)| {
                let a = l.lora.as_ref().unwrap();
                a.initial.is_some() && a.lora_b.abs().sum(Kind::Float).double_value(&[]) > 0.0
            });
            assert!(changed, "{name}: PiSSA/OLoRA start with B ≠ 0 and remember the initial adapter");
            let off = without_adapters(&m.lm, |lm| Ok(logits(lm, &ids))).unwrap();
            assert!(max_rel_diff(&off, &base) < 1e-4, "{name}: disabled adapters are not the base as loaded");
        }
        if name == "patterns" {
            let r_of = |p: &str| {
                m.lm.linears()
                    .into_iter()
                    .find(|(n, _)| n == p)
                    .unwrap()
                    .1
                    .lora
                    .as_ref()
                    .map(|l| (l.lora_a.size()[0], l.scaling))
            };
            assert_eq!(r_of("model.layers.1.self_attn.q_proj"), Some((2, 4.0)));
            assert_eq!(r_of("model.layers.1.self_attn.v_proj"), Some((4, 8.0)));
            assert_eq!(r_of("model.layers.1.mlp.down_proj"), Some((6, 8.0 / 6.0)));
            assert_eq!(r_of("model.layers.0.self_attn.q_proj"), None, "layer 0 is not transformed");
        }
        randomise_adapters(&m.lm, 5);
        tch::no_grad(|| {
            for (_, lin) in m.lm.linears() {
                if let Some(mag) = lin.lora.as_ref().and_then(|l| l.magnitude.as_ref()) {
                    let _ = mag.shallow_clone().f_mul_(&(mag.randn_like() * 0.1 + 1.0)).unwrap();
                }
            }
        });
        let ours = logits(&m.lm, &ids);
        assert!(max_rel_diff(&ours, &base) > 0.1, "{name}: the adapter should matter");

        let out = tmp.path().join(name);
        let opts = AdapterSaveOptions {
            base_model_name_or_path: Some(base_dir.to_string_lossy().into_owned()),
            companions_from: Some(&base_dir),
        };
        save_adapter(&m.lm, &out, &opts).unwrap();
        let saved = Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap();
        assert_eq!(saved.len(), keys, "{name}: {:?}", saved.iter().map(|(n, _)| n).collect::<Vec<_>>());
        // the config reads back ("all-linear" is written as the names it selected, as PEFT does)
        let read = read_adapter_config(&out).unwrap();
        assert_eq!(read, LoraConfig { targets: read.targets.clone(), ..cfg.clone() }, "{name}");
        // loaded into a fresh base (PiSSA / OLoRA: the initialisation is repeated on it) …
        let mut fresh = load("tiny-llama");
        load_adapter(&fresh.vs, &mut fresh.lm, &out).unwrap();
        assert!(max_rel_diff(&logits(&fresh.lm, &ids), &ours) < 1e-6, "{name}: reload differs");
        // … into adapters attached from the same config (resume) …
        let mut resumed = load("tiny-llama");
        attach_lora(&resumed.vs, &mut resumed.lm, &cfg).unwrap();
        load_adapter(&resumed.vs, &mut resumed.lm, &out).unwrap();
        assert!(max_rel_diff(&logits(&resumed.lm, &ids), &ours) < 1e-6, "{name}: resume differs");
        // … and in PEFT
        let golden = tmp.path().join(format!("{name}-golden.safetensors"));
        Tensor::write_safetensors(&[("input_ids", &ids), ("logits", &ours)], &golden).unwrap();
        peft_check(name, &out, &golden);

        // merging (DoRA exactly: m / ‖W + ΔW‖ · (W + ΔW)) gives the same function
        merge_lora(&fresh.vs, &mut fresh.lm).unwrap();
        let d = max_rel_diff(&logits(&fresh.lm, &ids), &ours);
        assert!(d < 1e-4, "{name}: merged differs from unmerged by {d}");
        assert!(fresh.vs.variables().keys().all(|k| !k.contains("lora_")), "{name}: merge leaves adapter variables");
    }
}

#[test]
fn dora_merges_into_a_folder_transformers_loads_with_equal_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = adapter_dir("qwen2-dora-qv");
    let mut m = load("tiny-qwen2");
    load_adapter(&m.vs, &mut m.lm, &adapter).unwrap();
    merge_lora(&m.vs, &mut m.lm).unwrap();
    let out = tmp.path().join("merged");
    let base_dir = model_dir("tiny-qwen2");
    let opts = align_core::hf::checkpoint::SaveOptions { companions_from: Some(&base_dir), ..Default::default() };
    align_core::hf::checkpoint::save_pretrained(&m.vs, &m.lm.config, &out, &opts).unwrap();
    // PEFT's own logits of the unmerged DoRA adapter
    let golden = adapter.join("golden.safetensors");
    let ids = tensor(&golden, "input_ids");
    let d = max_rel_diff(&logits(&m.lm, &ids), &tensor(&golden, "logits"));
    assert!(d <= 1e-4, "merged DoRA differs from PEFT's unmerged logits by {d}");
    let Some(python) = python_with(&["transformers"]) else {
        eprintln!("skipping the transformers check: no python with transformers");
        return;
    };
    let out = Command::new(python)
        .arg(fixtures().join("check_hf_load.py"))
        .args([out.to_str().unwrap(), golden.to_str().unwrap(), "--atol", "1e-4", "--rtol", "1e-4"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "transformers does not reproduce PEFT's DoRA logits from our merged folder:\n{text}");
}

#[test]
fn lora_variant_options_are_checked() {
    let bad = |f: &dyn Fn(&mut LoraConfig)| {
        let mut c = LoraConfig::default();
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    let e = bad(&|c| {
        c.use_dora = true;
        c.init_lora_weights = LoraInit::Pissa;
    });
    assert!(e.contains("lora.use_dora") && e.contains("pissa"), "{e}");
    let e = bad(&|c| c.loraplus_lr_ratio = Some(0.0));
    assert!(e.contains("lora.loraplus_lr_ratio"), "{e}");
    let e = bad(&|c| c.rank_pattern = [("q_proj".to_string(), 0)].into());
    assert!(e.contains("lora.rank_pattern") && e.contains("'q_proj'"), "{e}");
    let e = bad(&|c| c.alpha_pattern = [("(".to_string(), 1.0)].into());
    assert!(e.contains("lora.alpha_pattern") && e.contains("regular expression"), "{e}");
    let e = bad(&|c| {
        c.targets = LoraTargets::Pattern(r".*\.q_proj".into());
        c.layers_to_transform = Some(vec![0]);
    });
    assert!(e.contains("lora.layers_to_transform"), "{e}");
    // two keys matching one module are ambiguous (PEFT would take the first in writing order)
    let c = LoraConfig {
        rank_pattern: [("q_proj".to_string(), 2), (r"self_attn\..*".to_string(), 3)].into(),
        ..Default::default()
    };
    let e = c.rank_of("model.layers.0.self_attn.q_proj").unwrap_err().to_string();
    assert!(e.contains("both"), "{e}");
    assert_eq!(c.rank_of("model.layers.0.self_attn.k_proj").unwrap(), 3);
    assert_eq!(c.rank_of("model.layers.0.mlp.up_proj").unwrap(), 8);
    // a config reads PEFT's spellings
    let c: LoraConfig =
        toml::from_str("init_lora_weights = \"olora\"\nlayers_to_transform = 1\nuse_dora = false").unwrap();
    assert_eq!((c.init_lora_weights, c.layers_to_transform), (LoraInit::Olora, Some(vec![1])));
    let e = toml::from_str::<LoraConfig>("init_lora_weights = false").unwrap_err().to_string();
    assert!(e.contains("init_lora_weights"), "{e}");
    // PiSSA needs the full-precision base
    let mut q = load("tiny-llama");
    q.lm.model.quantize(&q.vs, align_core::model::quant::Quantization::from_flags("nf4", false).unwrap()).unwrap();
    let e = attach_lora(&q.vs, &mut q.lm, &LoraConfig { init_lora_weights: LoraInit::Pissa, ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("init_lora_weights") && e.contains("quantised"), "{e}");
}

#[test]
fn dora_trains_the_magnitudes_and_lora_plus_scales_b_and_magnitudes() {
    use align_core::peft::lora::loraplus_lr_scale;
    let mut m = load("tiny-llama");
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_dora: true,
        loraplus_lr_ratio: Some(16.0),
        ..Default::default()
    };
    attach_lora(&m.vs, &mut m.lm, &cfg).unwrap();
    let trainable = trainable_parameters(&m.vs);
    assert_eq!(trainable.len(), 14 * 3);
    let scales: Vec<f64> = trainable.iter().map(|(n, t)| loraplus_lr_scale(&cfg, n, t)).collect();
    for ((n, _), s) in trainable.iter().zip(&scales) {
        let want = if n.ends_with("lora_A.weight") { 1.0 } else { 16.0 };
        assert_eq!(*s, want, "{n}");
    }
    randomise_adapters(&m.lm, 9);
    m.lm.set_training(true);
    let ids = tensor(&model_dir("tiny-llama").join("golden.safetensors"), "input_ids");
    let loss = m.lm.forward(&ids, &ForwardOptions::default(), None).unwrap().pow_tensor_scalar(2).mean(Kind::Float);
    loss.backward();
    for (n, t) in &trainable {
        let g = t.grad();
        assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{n} got no gradient");
    }
}
