//! LoRA on a reward model (trunk adapters + the `score` head trained in full, as PEFT's
//! `task_type = "SEQ_CLS"`, `modules_to_save = ["score"]`): a PEFT-written adapter reproduces
//! PEFT's scores, ours loads in PEFT with equal scores, merging keeps the scores, only adapters and
//! head train, and adapters of the wrong kind fail with an error naming the field. Fixture:
//! `tests/fixtures/make_peft_fixtures.py` (`peft/llama-seqcls`).
use std::path::{Path, PathBuf};
use std::process::Command;

use align_core::load::spec::load_reward_model_or_adapter;
use align_core::model::scalar::{
    load_reward_model, scalar_model_from_causal_lm, write_scalar_model, LoadedScalarModel, ScalarModel, ScoreInit,
};
use align_core::peft::ia3::{attach_ia3, load_ia3_adapter, merge_ia3, save_ia3_adapter, Ia3Config};
use align_core::peft::lora::{
    apply_freeze, attach_lora, load_adapter, merge_lora, read_adapter_folder_config, save_adapter,
    trainable_parameters, without_adapters, AdapterSaveOptions, FreezeConfig, LoraConfig, LoraTargets,
};
use align_core::peft::prompt::{
    attach_prompt_learning, load_prompt_adapter, save_prompt_adapter, EncoderType, PTuningConfig, PrefixTuningConfig,
    PromptInit, PromptLearningConfig, PromptTuningConfig,
};
use align_core::train::setup::TrainingScalarModel;
use align_testkit::python_with;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn tensor(file: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(file).unwrap().into_iter().find(|(n, _)| n == name).unwrap().1
}

/// The trunk of a causal-LM fixture with a seeded head (pad id 0).
fn scalar(name: &str, seed: u64) -> LoadedScalarModel {
    scalar_model_from_causal_lm(&model_dir(name), Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, seed))
        .unwrap()
}

fn scores(rm: &ScalarModel, ids: &Tensor) -> Vec<f32> {
    Vec::try_from(tch::no_grad(|| rm.forward(ids)).unwrap()).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Right-padded rows (pad id 0), one without padding: the rows the fixture was scored on.
fn padded_ids() -> Tensor {
    tensor(&fixtures().join("peft/llama-seqcls/golden.safetensors"), "input_ids")
}

/// Gives every adapter a non-zero B (A is already random) so it changes the scores.
fn randomise_adapters(rm: &ScalarModel, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (_, lin) in rm.linears() {
            if let Some(l) = &lin.lora {
                l.lora_b.shallow_clone().copy_(&(Tensor::randn(l.lora_b.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
}

#[test]
fn peft_reward_adapter_reproduces_peft_scores_and_merges() {
    let dir = fixtures().join("peft/llama-seqcls");
    let want: Vec<f32> = Vec::try_from(tensor(&dir.join("golden.safetensors"), "scores")).unwrap();
    let folder = read_adapter_folder_config(&dir).unwrap();
    assert!(folder.is_reward_model());
    assert_eq!(folder.modules_to_save, vec!["score", "classifier"], "PEFT's repeats are dropped");
    // on the causal LM's trunk with a zero head: the adapter brings the trained head
    let mut m =
        scalar_model_from_causal_lm(&model_dir("tiny-llama"), Device::Cpu, Kind::Float, 0, ScoreInit::Zeros).unwrap();
    let ids = padded_ids();
    let cfg = load_adapter(&m.vs, &mut m.rm, &dir).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
    let got = scores(&m.rm, &ids);
    assert!(max_diff(&got, &want) < 1e-5, "ours {got:?} vs PEFT {want:?}");
    // disabling the adapters leaves the (loaded) head on the base trunk
    let off = without_adapters(&m.rm, |rm| Ok(scores(rm, &ids))).unwrap();
    assert!(max_diff(&off, &want) > 1e-3, "the adapters change the scores");
    assert!(m.rm.model.adapters_enabled());
    merge_lora(&m.vs, &mut m.rm).unwrap();
    assert!(m.rm.lora_config().is_none() && m.vs.variables().keys().all(|k| !k.contains("lora_")));
    assert!(max_diff(&scores(&m.rm, &ids), &want) < 1e-5, "merging changes the scores");
    // the merged model saves as a reward-model folder with the same scores
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    std::fs::create_dir_all(&out).unwrap();
    write_scalar_model(&m.vs, &m.rm, &out, None, Some(&model_dir("tiny-llama"))).unwrap();
    let back = load_reward_model(&out, Device::Cpu, Kind::Float).unwrap();
    assert!(max_diff(&scores(&back.rm, &ids), &want) < 1e-5);
    // the loader every consumer uses: base + adapter, merged
    let (rm, tok_dir) =
        load_reward_model_or_adapter(&model_dir("tiny-llama"), Some(&dir), Device::Cpu, Kind::Float).unwrap();
    assert!(max_diff(&scores(&rm.rm, &ids), &want) < 1e-5);
    assert_eq!(tok_dir, model_dir("tiny-llama"), "the fixture holds no tokenizer files");
}

#[test]
fn our_reward_adapter_holds_adapters_and_head_and_loads_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = padded_ids();
    for (name, base, cfg) in [
        (
            "llama-qv",
            "tiny-llama",
            LoraConfig { r: 4, alpha: 8.0, targets: LoraTargets::names(&["q_proj", "v_proj"]), ..Default::default() },
        ),
        ("qwen2-all", "tiny-qwen2", LoraConfig { r: 4, alpha: 16.0, ..Default::default() }),
    ] {
        let mut m = scalar(base, 3);
        tch::manual_seed(5);
        attach_lora(&m.vs, &mut m.rm, &cfg).unwrap();
        // only the adapters and the head train
        let trainable: Vec<String> = trainable_parameters(&m.vs).into_iter().map(|(n, _)| n).collect();
        assert!(trainable.contains(&"score.weight".to_string()), "{name}: {trainable:?}");
        assert!(trainable.iter().all(|n| n == "score.weight" || n.contains(".lora_")), "{name}: {trainable:?}");
        let head_before = scores(&m.rm, &ids);
        randomise_adapters(&m.rm, 6);
        let ours = scores(&m.rm, &ids);
        assert!(max_diff(&ours, &head_before) > 1e-3, "{name}: the adapters change the scores");
        let out = tmp.path().join(name);
        let base_dir = model_dir(base);
        let opts = AdapterSaveOptions {
            base_model_name_or_path: Some(base_dir.display().to_string()),
            companions_from: Some(&base_dir),
        };
        save_adapter(&m.rm, &out, &opts).unwrap();
        let cfg_json: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg_json["task_type"], "SEQ_CLS");
        assert_eq!(cfg_json["modules_to_save"], json!(["score"]));
        let keys: Vec<String> = Tensor::read_safetensors(out.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(keys.contains(&"base_model.model.score.weight".to_string()), "{name}: {keys:?}");
        assert!(keys.iter().all(|k| k == "base_model.model.score.weight" || k.contains(".lora_")), "{keys:?}");

        // an adapter folder given as the model resolves its base from base_model_name_or_path
        let (back, _) = load_reward_model_or_adapter(&out, None, Device::Cpu, Kind::Float).unwrap();
        assert!(max_diff(&scores(&back.rm, &ids), &ours) < 1e-5, "{name}: reload differs");
        // … and a scalar model trained in full from it (PPO's critic) is that merged model
        let critic = TrainingScalarModel::from_dir(&out, Device::Cpu, Kind::Float, |_| ScoreInit::Zeros).unwrap();
        assert!(critic.loaded.vs.variables().iter().all(|(n, t)| t.requires_grad() && !n.contains("lora_")));
        assert!(max_diff(&scores(&critic.loaded.rm, &ids), &ours) < 1e-5, "{name}: critic differs");
        // resuming: the same adapter into adapters attached from the same config
        let mut resumed = scalar(base, 99);
        attach_lora(&resumed.vs, &mut resumed.rm, &cfg).unwrap();
        load_adapter(&resumed.vs, &mut resumed.rm, &out).unwrap();
        assert!(max_diff(&scores(&resumed.rm, &ids), &ours) < 1e-6, "{name}: resume differs");

        peft_check_reward(name, &out, &ids, &ours);
    }
}

#[test]
fn adapters_of_the_wrong_kind_fail_naming_the_field() {
    // a reward-model adapter does not load onto a causal LM
    let mut lm = align_core::load_causal_lm(&model_dir("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
    let e = format!("{:#}", load_adapter(&lm.vs, &mut lm.lm, &fixtures().join("peft/llama-seqcls")).unwrap_err());
    assert!(e.contains("adapter_config.json: field 'modules_to_save': module 'score'"), "{e}");
    // a causal-LM adapter adapts only the trunk of a reward model: the head stays as it was
    let ids = padded_ids();
    let mut m = scalar("tiny-llama", 4);
    let before = scores(&m.rm, &ids);
    let head = m.rm.score.weight.copy();
    load_adapter(&m.vs, &mut m.rm, &fixtures().join("peft/llama-qv")).unwrap();
    assert!(m.rm.score.weight.equal(&head));
    assert!(max_diff(&scores(&m.rm, &ids), &before) > 1e-4);
    // … but is not a reward model by itself
    let e = format!(
        "{:#}",
        load_reward_model_or_adapter(
            &model_dir("tiny-llama"),
            Some(&fixtures().join("peft/llama-qv")),
            Device::Cpu,
            Kind::Float
        )
        .err()
        .unwrap()
    );
    assert!(e.contains("reward") && e.contains("adapter_config.json"), "{e}");
    // a reward-model adapter whose file lacks the head it declares
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("no-head");
    std::fs::create_dir_all(&broken).unwrap();
    let src = fixtures().join("peft/llama-seqcls");
    std::fs::copy(src.join("adapter_config.json"), broken.join("adapter_config.json")).unwrap();
    let kept: Vec<(String, Tensor)> = Tensor::read_safetensors(src.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("score.weight"))
        .collect();
    Tensor::write_safetensors(&kept, broken.join("adapter_model.safetensors")).unwrap();
    let mut m = scalar("tiny-llama", 4);
    let e = format!("{:#}", load_adapter(&m.vs, &mut m.rm, &broken).unwrap_err());
    assert!(e.contains("adapter_model.safetensors") && e.contains("base_model.model.score.weight"), "{e}");
}

#[test]
fn freezing_a_reward_model_keeps_its_head_trainable() {
    let m = scalar("tiny-qwen2", 1);
    let trained = apply_freeze(&m.vs, &m.rm, &FreezeConfig { last_layers: Some(1), modules: vec![] }).unwrap();
    assert!(trained.contains(&"score.weight".to_string()));
    assert!(trained.iter().all(|n| n == "score.weight" || n.starts_with("model.layers.1.")), "{trained:?}");
    // LoRA and freezing do not combine, as for a causal LM
    let mut m = scalar("tiny-qwen2", 1);
    attach_lora(&m.vs, &mut m.rm, &LoraConfig::default()).unwrap();
    let e = apply_freeze(&m.vs, &m.rm, &FreezeConfig { last_layers: Some(1), modules: vec![] }).unwrap_err();
    assert!(e.to_string().contains("freeze"), "{e}");
    // a model with adapters attached cannot be saved as a full folder by mistake
    let tmp = tempfile::tempdir().unwrap();
    let e = write_scalar_model(&m.vs, &m.rm, tmp.path(), None, None).unwrap_err().to_string();
    assert!(e.contains("LoRA"), "{e}");
}

/// (IA)³ on a reward model (PEFT's `SEQ_CLS` IA3: vectors on the trunk, the `score` head in
/// `modules_to_save`): PEFT's folder (`peft/llama-ia3-seqcls`, `make_ia3_fixtures.py`) gives
/// PEFT's scores on right-padded rows and merges exactly; ours holds the vectors and the head
/// under PEFT's names, reloads, and loads in PEFT with equal scores.
#[test]
fn ia3_reward_adapters_match_peft_merge_and_ours_load_in_peft() {
    let dir = fixtures().join("peft/llama-ia3-seqcls");
    let golden = dir.join("golden.safetensors");
    let (ids, want) = (tensor(&golden, "input_ids"), Vec::<f32>::try_from(tensor(&golden, "scores")).unwrap());
    let rel = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(x, y)| ((x - y).abs() / y.abs().max(1.0)) as f64).fold(0.0, f64::max)
    };
    let mut m =
        scalar_model_from_causal_lm(&model_dir("tiny-llama"), Device::Cpu, Kind::Float, 0, ScoreInit::Zeros).unwrap();
    load_ia3_adapter(&m.vs, &mut m.rm, &dir, false).unwrap();
    let got = scores(&m.rm, &ids);
    assert!(rel(&got, &want) < 1e-4, "ours {got:?} vs PEFT {want:?}");
    merge_ia3(&m.vs, &mut m.rm).unwrap();
    assert!(m.vs.variables().keys().all(|k| !k.contains("ia3_l")));
    assert!(rel(&scores(&m.rm, &ids), &want) < 1e-4, "merging changes the scores");
    // the loader every consumer uses (base + adapter), merged
    let (rm, _) = load_reward_model_or_adapter(&model_dir("tiny-llama"), Some(&dir), Device::Cpu, Kind::Float).unwrap();
    assert!(rel(&scores(&rm.rm, &ids), &want) < 1e-4);
    // a reward-model (IA)³ folder is not a causal LM's, and a causal LM's is not a reward model's
    let mut lm = align_core::model::io::load_causal_lm(&model_dir("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
    let e = format!("{:#}", load_ia3_adapter(&lm.vs, &mut lm.lm, &dir, false).unwrap_err());
    assert!(e.contains("adapter_config.json: field 'task_type'") && e.contains("reward"), "{e}");
    let mut s = scalar("tiny-llama", 1);
    let e = format!("{:#}", load_ia3_adapter(&s.vs, &mut s.rm, &fixtures().join("peft/llama-ia3"), false).unwrap_err());
    assert!(e.contains("adapter_config.json: field 'task_type'") && e.contains("SEQ_CLS"), "{e}");

    // ours: attached, vectors randomised, saved as PEFT writes it
    let tmp = tempfile::tempdir().unwrap();
    let mut m = scalar("tiny-qwen2", 3);
    attach_ia3(&m.vs, &mut m.rm, &Ia3Config::default()).unwrap();
    let trainable: Vec<String> = trainable_parameters(&m.vs).into_iter().map(|(n, _)| n).collect();
    assert!(trainable.iter().all(|n| n == "score.weight" || n.ends_with(".ia3_l")), "{trainable:?}");
    assert!(trainable.contains(&"score.weight".to_string()));
    tch::manual_seed(8);
    tch::no_grad(|| {
        for (_, lin) in m.rm.linears() {
            if let Some(v) = &lin.ia3 {
                v.vector
                    .shallow_clone()
                    .copy_(&(Tensor::randn(v.vector.size(), (Kind::Float, Device::Cpu)) * 0.3 + 1.0));
            }
        }
    });
    let ours = scores(&m.rm, &ids);
    let out = tmp.path().join("qwen2-ia3-rm");
    let opts = AdapterSaveOptions {
        base_model_name_or_path: Some(model_dir("tiny-qwen2").display().to_string()),
        companions_from: None,
    };
    save_ia3_adapter(&m.rm, &out, &opts).unwrap();
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg_json["task_type"].as_str(), cfg_json["peft_type"].as_str()), (Some("SEQ_CLS"), Some("IA3")));
    assert_eq!(cfg_json["modules_to_save"], json!(["classifier", "score"]), "as PEFT 0.21 writes it");
    let keys: Vec<String> =
        Tensor::read_safetensors(out.join("adapter_model.safetensors")).unwrap().into_iter().map(|(n, _)| n).collect();
    assert!(keys.contains(&"base_model.model.score.weight".to_string()), "{keys:?}");
    assert!(keys.iter().all(|k| k == "base_model.model.score.weight" || k.ends_with(".ia3_l")), "{keys:?}");
    let (back, _) = load_reward_model_or_adapter(&out, None, Device::Cpu, Kind::Float).unwrap();
    assert!(max_diff(&scores(&back.rm, &ids), &ours) < 1e-5, "reload differs");
    peft_check_reward("qwen2-ia3-rm", &out, &ids, &ours);
}

/// Scores `ids` (pad id 0) with PEFT on the reward-model adapter folder `out` and compares them
/// with `ours` (`make_peft_fixtures.py check-reward`); skipped, saying so, without PEFT.
fn peft_check_reward(name: &str, out: &Path, ids: &Tensor, ours: &[f32]) {
    let Some(python) = python_with(&["transformers", "peft"]) else {
        eprintln!("skipping the PEFT check of our reward adapter '{name}': no python with transformers and peft");
        return;
    };
    let rows: Vec<Vec<i64>> = (0..ids.size()[0]).map(|i| Vec::try_from(ids.get(i)).unwrap()).collect();
    let file = out.with_extension("scores.json");
    std::fs::write(&file, json!({"input_ids": rows, "scores": ours, "pad_token_id": 0}).to_string()).unwrap();
    let r = Command::new(python)
        .arg(fixtures().join("make_peft_fixtures.py"))
        .args(["check-reward", out.to_str().unwrap(), file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success(), "{name}: PEFT does not reproduce our scores:\n{text}");
}

/// Prompt learning on a reward model (PEFT's `SEQ_CLS` prompt tuning, P-tuning, prefix tuning:
/// the virtual tokens and the `score` head, saved as `base_model.score.weight`). PEFT scores
/// prompt tuning and P-tuning at every row's last position (it passes `inputs_embeds`), align at
/// the last non-pad token: those two are compared on rows without padding.
#[test]
fn prompt_learning_reward_adapters_match_peft_and_ours_load_in_peft() {
    for (folder, nv) in [("llama-prompt-seqcls", 4), ("llama-ptuning-seqcls", 3), ("llama-prefix-seqcls", 3)] {
        let dir = fixtures().join("peft").join(folder);
        let golden = dir.join("golden.safetensors");
        let (ids, want) = (tensor(&golden, "input_ids"), Vec::<f32>::try_from(tensor(&golden, "scores")).unwrap());
        let mut m =
            scalar_model_from_causal_lm(&model_dir("tiny-llama"), Device::Cpu, Kind::Float, 0, ScoreInit::Zeros)
                .unwrap();
        let plain = scores(&m.rm, &ids);
        let cfg = load_prompt_adapter(&m.vs, &mut m.rm, &dir, false).unwrap();
        assert_eq!(cfg.num_virtual_tokens(), nv, "{folder}");
        let got = scores(&m.rm, &ids);
        assert!(max_diff(&got, &want) < 1e-4, "{folder}: ours {got:?} vs PEFT {want:?}");
        assert!(max_diff(&plain, &want) > 1e-2, "{folder}: the adapter must change the scores");
        assert!(trainable_parameters(&m.vs).is_empty(), "{folder}: loaded frozen");
        // the loader every consumer uses (base + adapter)
        let (rm, _) =
            load_reward_model_or_adapter(&model_dir("tiny-llama"), Some(&dir), Device::Cpu, Kind::Float).unwrap();
        assert!(max_diff(&scores(&rm.rm, &ids), &want) < 1e-4, "{folder}");
        // a reward model's folder is not a causal LM's
        let mut lm = align_core::model::io::load_causal_lm(&model_dir("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
        let e = format!("{:#}", load_prompt_adapter(&lm.vs, &mut lm.lm, &dir, false).unwrap_err());
        assert!(e.contains("adapter_config.json: field 'task_type'") && e.contains("reward"), "{e}");
    }
    // and a causal LM's is not a reward model's
    let mut s = scalar("tiny-llama", 1);
    let e = format!(
        "{:#}",
        load_prompt_adapter(&s.vs, &mut s.rm, &fixtures().join("peft/llama-prompt-text"), false).unwrap_err()
    );
    assert!(e.contains("adapter_config.json: field 'task_type'") && e.contains("SEQ_CLS"), "{e}");

    // ours: attached (head and virtual tokens train), saved as PEFT writes it, loaded back here
    // and by PEFT
    let tmp = tempfile::tempdir().unwrap();
    let unpadded = tensor(&fixtures().join("peft/llama-prompt-seqcls/golden.safetensors"), "input_ids");
    let prompt = PromptLearningConfig::PromptTuning(PromptTuningConfig {
        num_virtual_tokens: 4,
        prompt_tuning_init: PromptInit::Random,
        prompt_tuning_init_text: None,
    });
    let p_tuning = PromptLearningConfig::PTuning(PTuningConfig {
        num_virtual_tokens: 3,
        encoder_reparameterization_type: EncoderType::Mlp,
        encoder_hidden_size: Some(8),
        encoder_num_layers: None,
        encoder_dropout: None,
    });
    let prefix = PromptLearningConfig::PrefixTuning(PrefixTuningConfig {
        num_virtual_tokens: 3,
        prefix_projection: true,
        encoder_hidden_size: Some(8),
    });
    for (name, config, ids) in [
        ("qwen2-prompt-rm", prompt, unpadded.shallow_clone()),
        ("qwen2-ptuning-rm", p_tuning, unpadded.shallow_clone()),
        ("qwen2-prefix-rm", prefix, padded_ids()),
    ] {
        let mut m = scalar("tiny-qwen2", 3);
        tch::manual_seed(9);
        attach_prompt_learning(&m.vs, &mut m.rm, &config, None).unwrap();
        let trainable: Vec<String> = trainable_parameters(&m.vs).into_iter().map(|(n, _)| n).collect();
        assert!(trainable.contains(&"score.weight".to_string()), "{name}: {trainable:?}");
        assert!(trainable.iter().all(|n| n == "score.weight" || n.starts_with("prompt_")), "{name}: {trainable:?}");
        let ours = scores(&m.rm, &ids);
        let out = tmp.path().join(name);
        let opts = AdapterSaveOptions {
            base_model_name_or_path: Some(model_dir("tiny-qwen2").display().to_string()),
            companions_from: None,
        };
        save_prompt_adapter(&m.rm, &out, &opts).unwrap();
        let cfg_json: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg_json["task_type"], "SEQ_CLS", "{name}");
        assert_eq!(cfg_json["modules_to_save"], json!(["classifier", "score"]), "{name}: as PEFT 0.21 writes it");
        let keys: Vec<String> = Tensor::read_safetensors(out.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(keys.len(), 2, "{name}: {keys:?}");
        assert!(
            keys.contains(&"base_model.score.weight".to_string()) && keys.contains(&"prompt_embeddings".to_string())
        );
        let (back, _) = load_reward_model_or_adapter(&out, None, Device::Cpu, Kind::Float).unwrap();
        assert!(max_diff(&scores(&back.rm, &ids), &ours) < 1e-5, "{name}: reload differs");
        peft_check_reward(name, &out, &ids, &ours);
    }
}
