//! Prompt tuning, P-tuning and prefix tuning: PEFT-written folders reproduce PEFT's logits, the folders we
//! write load in PEFT with equal logits, the virtual tokens go through the KV cache, left padding
//! and gradient checkpointing as through a plain forward pass, only they train, and bad folders
//! fail with one clear error. Fixtures: `tests/fixtures/make_prompt_fixtures.py`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use align_core::model::decoder::{ForwardOptions, KvCache};
use align_core::model::io::{load_causal_lm, LoadedModel};
use align_core::peft::lora::{attach_lora, trainable_parameters, without_adapters, AdapterSaveOptions, LoraConfig};
use align_core::peft::prompt::{
    attach_prompt_learning, load_prompt_adapter, restore_prompt_weights, save_prompt_adapter, EncoderType,
    PTuningConfig, PrefixTuningConfig, PromptEncoder, PromptInit, PromptLearningConfig, PromptTuningConfig,
    PROMPT_ENCODER_FILE,
};
use align_core::text::tokenizer::ModelTokenizer;
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

/// (PEFT fixture, base model, virtual tokens)
const PEFT_FOLDERS: &[(&str, &str, i64)] = &[
    ("llama-prompt-text", "tiny-llama", 5),
    ("qwen2-prefix", "tiny-qwen2", 3),
    ("llama-prefix-proj", "tiny-llama", 3),
    ("llama-ptuning-mlp", "tiny-llama", 4),
    ("qwen2-ptuning-lstm", "tiny-qwen2", 3),
];

#[test]
fn peft_prompt_learning_folders_reproduce_peft_logits_and_disabled_gives_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    for (folder, base, nv) in PEFT_FOLDERS {
        let golden = adapter_dir(folder).join("golden.safetensors");
        let ids = tensor(&golden, "input_ids");
        // the folder as PEFT wrote it (the table), and with the encoder's weights beside it
        // (P-tuning's MLP / LSTM, prefix tuning's projection: our encoder against PEFT's)
        let as_peft = tmp.path().join(folder);
        std::fs::create_dir_all(&as_peft).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter_dir(folder).join(f), as_peft.join(f)).unwrap();
        }
        let with_encoder = adapter_dir(folder).join(PROMPT_ENCODER_FILE).is_file();
        assert_eq!(with_encoder, folder.contains("proj") || folder.contains("ptuning"), "{folder}");
        for dir in [as_peft, adapter_dir(folder)] {
            let mut m = load(base);
            let plain = logits(&m.lm, &ids);
            let cfg = load_prompt_adapter(&m.vs, &mut m.lm, &dir, false).unwrap();
            assert_eq!(cfg.num_virtual_tokens(), *nv, "{folder}");
            let with = logits(&m.lm, &ids);
            let d = max_rel_diff(&with, &tensor(&golden, "logits"));
            assert!(d <= 1e-4, "{}: max relative logit difference to PEFT {d}", dir.display());
            assert!(max_rel_diff(&with, &plain) > 0.05, "{folder}: the virtual tokens should change the logits");
            let off = without_adapters(&m.lm, |lm| Ok(logits(lm, &ids))).unwrap();
            assert!(off.equal(&plain), "{folder}: with adapters disabled the base model's logits");
            assert!(trainable_parameters(&m.vs).is_empty(), "{folder}: loaded frozen");
        }
    }
}

#[test]
fn text_initialisation_takes_the_texts_token_embeddings_as_peft() {
    let mut m = load("tiny-llama");
    let tok = ModelTokenizer::from_dir(&model_dir("tiny-llama")).unwrap();
    let cfg = PromptLearningConfig::PromptTuning(PromptTuningConfig {
        num_virtual_tokens: 5,
        prompt_tuning_init: PromptInit::Text,
        prompt_tuning_init_text: Some("hello world".into()),
    });
    attach_prompt_learning(&m.vs, &mut m.lm, &cfg, Some(&tok)).unwrap();
    let vars = m.vs.variables();
    let want = tensor(&adapter_dir("llama-prompt-text").join("golden.safetensors"), "text_init");
    assert!(vars["prompt_embeddings"].equal(&want), "the text's embeddings, repeated to 5 tokens, as PEFT");
    assert!(vars["prompt_embeddings"].requires_grad());
    let names: Vec<String> = trainable_parameters(&m.vs).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["prompt_embeddings"], "only the prompt trains");
}

fn prompt(init: PromptInit) -> PromptLearningConfig {
    PromptLearningConfig::PromptTuning(PromptTuningConfig {
        num_virtual_tokens: 4,
        prompt_tuning_init: init,
        prompt_tuning_init_text: None,
    })
}

fn prefix(projection: bool) -> PromptLearningConfig {
    PromptLearningConfig::PrefixTuning(PrefixTuningConfig {
        num_virtual_tokens: 3,
        prefix_projection: projection,
        encoder_hidden_size: projection.then_some(8),
    })
}

fn p_tuning(encoder: EncoderType) -> PromptLearningConfig {
    PromptLearningConfig::PTuning(PTuningConfig {
        num_virtual_tokens: 3,
        encoder_reparameterization_type: encoder,
        encoder_hidden_size: Some(8),
        encoder_num_layers: (encoder == EncoderType::Lstm).then_some(1),
        encoder_dropout: None,
    })
}

/// (name, base, configuration)
fn variants() -> Vec<(&'static str, &'static str, PromptLearningConfig)> {
    vec![
        ("llama-prompt-random", "tiny-llama", prompt(PromptInit::Random)),
        ("qwen2-prompt-vocab", "tiny-qwen2", prompt(PromptInit::SampleVocab)),
        ("llama-prefix", "tiny-llama", prefix(false)),
        ("qwen2-prefix-proj", "tiny-qwen2", prefix(true)),
        ("llama-ptuning-mlp", "tiny-llama", p_tuning(EncoderType::Mlp)),
        ("qwen2-ptuning-lstm", "tiny-qwen2", p_tuning(EncoderType::Lstm)),
    ]
}

/// Runs `make_prompt_fixtures.py check` on our adapter folder; skipped without PEFT.
fn peft_check(name: &str, adapter: &Path, golden: &Path) {
    let Some(python) = python_with(&["transformers", "peft"]) else {
        eprintln!("skipping the PEFT check of '{name}': no python with transformers and peft");
        return;
    };
    let out = Command::new(python)
        .arg(fixtures().join("make_prompt_fixtures.py"))
        .args(["check", adapter.to_str().unwrap(), golden.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name}: PEFT does not reproduce our logits:\n{text}");
}

#[test]
fn our_prompt_and_prefix_adapters_round_trip_and_load_in_peft() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, base, cfg) in variants() {
        let ids = tensor(&model_dir(base).join("golden.safetensors"), "input_ids").narrow(1, 0, 7).contiguous();
        let mut m = load(base);
        tch::manual_seed(5);
        attach_prompt_learning(&m.vs, &mut m.lm, &cfg, None).unwrap();
        let ours = logits(&m.lm, &ids);
        let out = tmp.path().join(name);
        let opts = AdapterSaveOptions {
            base_model_name_or_path: Some(model_dir(base).display().to_string()),
            companions_from: None,
        };
        save_prompt_adapter(&m.lm, &out, &opts).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(json["peft_type"], cfg.peft_type(), "{name}");
        assert_eq!(json["num_virtual_tokens"], cfg.num_virtual_tokens(), "{name}");
        let projection = matches!(&cfg, PromptLearningConfig::PrefixTuning(c) if c.prefix_projection)
            || matches!(&cfg, PromptLearningConfig::PTuning(_));
        assert_eq!(out.join(PROMPT_ENCODER_FILE).is_file(), projection, "{name}");
        // back into a fresh model (trainable, as a run that starts from it): the same logits
        let mut again = load(base);
        let read = load_prompt_adapter(&again.vs, &mut again.lm, &out, true).unwrap();
        assert_eq!(read, cfg, "{name}: the configuration survives the folder");
        assert!(logits(&again.lm, &ids).equal(&ours), "{name}: reloaded, the same logits");
        assert!(!trainable_parameters(&again.vs).is_empty(), "{name}");
        // a checkpoint of the same run restores every trained variable
        tch::manual_seed(6);
        let mut fresh = load(base);
        attach_prompt_learning(&fresh.vs, &mut fresh.lm, &cfg, None).unwrap();
        assert!(!logits(&fresh.lm, &ids).equal(&ours), "{name}: another seed, other virtual tokens");
        restore_prompt_weights(&fresh.vs, &out).unwrap();
        assert!(logits(&fresh.lm, &ids).equal(&ours), "{name}: restored, the same logits");
        if projection {
            // without the encoder's file the folder is PEFT's: the table, the same logits
            std::fs::remove_file(out.join(PROMPT_ENCODER_FILE)).unwrap();
            let mut table = load(base);
            load_prompt_adapter(&table.vs, &mut table.lm, &out, false).unwrap();
            let d = max_rel_diff(&logits(&table.lm, &ids), &ours);
            assert!(d <= 1e-6, "{name}: the saved table gives the projection's logits ({d})");
        }
        let golden = tmp.path().join(format!("{name}-golden.safetensors"));
        Tensor::write_safetensors(&[("input_ids", &ids), ("logits", &ours)], &golden).unwrap();
        peft_check(name, &out, &golden);
    }
}

/// Logits of `ids` `[1, T]` through the KV cache: `first` tokens, then one at a time.
fn cached_logits(lm: &CausalLm, ids: &Tensor, first: i64) -> Tensor {
    let t = ids.size()[1];
    let mut cache = KvCache::new(&lm.config, 1, t, Kind::Float, Device::Cpu).unwrap();
    let mut parts = Vec::new();
    tch::no_grad(|| {
        parts.push(lm.forward(&ids.narrow(1, 0, first), &ForwardOptions::default(), Some(&mut cache)).unwrap());
        for i in first..t {
            parts.push(lm.forward(&ids.narrow(1, i, 1), &ForwardOptions::default(), Some(&mut cache)).unwrap());
        }
    });
    assert_eq!(cache.len(), t, "the cache counts real tokens");
    Tensor::cat(&parts, 1)
}

#[test]
fn virtual_tokens_go_through_the_kv_cache_left_padding_and_generation() {
    for (name, base, cfg) in variants() {
        let ids = tensor(&model_dir(base).join("golden.safetensors"), "input_ids");
        let mut m = load(base);
        tch::manual_seed(7);
        attach_prompt_learning(&m.vs, &mut m.lm, &cfg, None).unwrap();
        let row = ids.narrow(0, 0, 1).narrow(1, 0, 9);
        let full = logits(&m.lm, &row);
        let d = max_rel_diff(&cached_logits(&m.lm, &row, 4), &full);
        assert!(d <= 1e-5, "{name}: cached logits differ from one pass by {d}");
        // a left-padded row of a batch gives its unpadded logits
        let short = ids.narrow(0, 1, 1).narrow(1, 0, 5);
        let padded = Tensor::cat(&[Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu)), short.shallow_clone()], 1);
        let batch = Tensor::cat(&[row.shallow_clone(), padded], 0);
        let mask = Tensor::cat(
            &[
                Tensor::ones([1, 9], (Kind::Int64, Device::Cpu)),
                Tensor::cat(
                    &[
                        Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu)),
                        Tensor::ones([1, 5], (Kind::Int64, Device::Cpu)),
                    ],
                    1,
                ),
            ],
            0,
        );
        let opts = ForwardOptions { attention_mask: Some(&mask), ..Default::default() };
        let both = tch::no_grad(|| m.lm.forward(&batch, &opts, None)).unwrap();
        let d = max_rel_diff(&both.narrow(0, 1, 1).narrow(1, 4, 5), &logits(&m.lm, &short));
        assert!(d <= 1e-5, "{name}: a left-padded row differs from itself alone by {d}");
        let d = max_rel_diff(&both.narrow(0, 0, 1), &full);
        assert!(d <= 1e-5, "{name}: an unpadded row of the batch differs by {d}");
        // batched greedy generation equals each prompt alone
        let tok_cfg = align_core::infer::generate::SamplingConfig { max_new_tokens: 6, ..Default::default() };
        let prompts: Vec<Vec<i64>> =
            vec![Vec::try_from(row.view([-1])).unwrap(), Vec::try_from(short.view([-1])).unwrap()];
        let together = align_core::infer::generate::generate(&m.lm, &prompts, &tok_cfg, &[], 0).unwrap();
        for (p, g) in prompts.iter().zip(&together) {
            let alone =
                align_core::infer::generate::generate(&m.lm, std::slice::from_ref(p), &tok_cfg, &[], 0).unwrap();
            assert_eq!(alone[0].tokens, g.tokens, "{name}: batched generation equals the prompt alone");
            // and the greedy tokens are those of full forward passes
            let mut seq = p.clone();
            for &tok in &g.tokens {
                let l = logits(&m.lm, &Tensor::from_slice(&seq).view([1, -1]));
                let next = l.get(0).get(seq.len() as i64 - 1).argmax(0, false).int64_value(&[]);
                assert_eq!(next, tok, "{name}: generation through the cache follows full passes");
                seq.push(tok);
            }
        }
    }
}

fn loss(lm: &CausalLm, ids: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let l = lm.forward(ids, &ForwardOptions::default(), None).unwrap();
    l.narrow(1, 0, t - 1).reshape([-1, l.size()[2]]).cross_entropy_for_logits(&ids.narrow(1, 1, t - 1).reshape([-1]))
}

fn grads(m: &LoadedModel, ids: &Tensor) -> BTreeMap<String, Tensor> {
    let params = trainable_parameters(&m.vs);
    for (_, p) in &params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    // the loop's backward pass: it also runs the recomputation of checkpointed layers
    align_core::model::recompute::backward(&loss(&m.lm, ids)).unwrap();
    params.into_iter().map(|(n, p)| (n, p.grad().copy())).collect()
}

#[test]
fn only_the_virtual_tokens_train_and_checkpointing_gives_the_same_gradients() {
    for (name, base, cfg) in variants() {
        let ids = tensor(&model_dir(base).join("golden.safetensors"), "input_ids");
        let mut m = load(base);
        tch::manual_seed(8);
        attach_prompt_learning(&m.vs, &mut m.lm, &cfg, None).unwrap();
        m.lm.set_training(true);
        let names: Vec<String> = trainable_parameters(&m.vs).into_iter().map(|(n, _)| n).collect();
        let mut want: Vec<String> = match &cfg {
            PromptLearningConfig::PrefixTuning(c) if c.prefix_projection => vec![
                "prompt_encoder.embedding.weight".into(),
                "prompt_encoder.transform.0.bias".into(),
                "prompt_encoder.transform.0.weight".into(),
                "prompt_encoder.transform.2.bias".into(),
                "prompt_encoder.transform.2.weight".into(),
            ],
            PromptLearningConfig::PTuning(c) => {
                PromptEncoder::names(c.encoder_reparameterization_type, c.lstm_layers())
            }
            _ => vec!["prompt_embeddings".into()],
        };
        want.sort();
        assert_eq!(names, want, "{name}");
        let plain = grads(&m, &ids);
        for (n, g) in &plain {
            assert!(g.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}: {n} receives a gradient");
        }
        m.lm.model.set_gradient_checkpointing(1);
        let checkpointed = grads(&m, &ids);
        m.lm.model.set_gradient_checkpointing(0);
        for (n, g) in &plain {
            assert!(checkpointed[n].equal(g), "{name}: {n}: checkpointed gradient differs");
        }
        // a few steps of plain SGD lower the loss: the virtual tokens learn
        let before = tch::no_grad(|| loss(&m.lm, &ids)).double_value(&[]);
        for _ in 0..20 {
            let g = grads(&m, &ids);
            tch::no_grad(|| {
                for (n, p) in trainable_parameters(&m.vs) {
                    let _ = p.shallow_clone().f_sub_(&(&g[&n] * 0.5)).unwrap();
                }
            });
        }
        let after = tch::no_grad(|| loss(&m.lm, &ids)).double_value(&[]);
        assert!(after < before, "{name}: loss {before} → {after}");
    }
}

fn edited(tmp: &Path, from: &str, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(adapter_dir(from).join(f), dir.join(f)).unwrap();
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
    dir
}

fn load_error(base: &str, dir: &Path) -> String {
    let mut m = load(base);
    format!("{:#}", load_prompt_adapter(&m.vs, &mut m.lm, dir, false).unwrap_err())
}

#[test]
fn bad_prompt_folders_and_options_fail_with_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str, Box<dyn FnOnce(&mut serde_json::Value)>, &str)> = vec![
        ("llama-prompt-text", "dim", Box::new(|v| v["token_dim"] = 64.into()), "field 'token_dim': the adapter has 64"),
        ("qwen2-prefix", "layers", Box::new(|v| v["num_layers"] = 3.into()), "field 'num_layers'"),
        (
            "qwen2-prefix",
            "nv",
            Box::new(|v| v["num_virtual_tokens"] = 4.into()),
            "tensor 'prompt_embeddings' has shape [3, 64]",
        ),
        ("llama-prompt-text", "ia3", Box::new(|v| v["peft_type"] = "ADAPTION_PROMPT".into()), "field 'peft_type'"),
        (
            "llama-ptuning-mlp",
            "encoder",
            Box::new(|v| v["encoder_reparameterization_type"] = "GRU".into()),
            "field 'encoder_reparameterization_type'",
        ),
        ("llama-prompt-text", "seqcls", Box::new(|v| v["task_type"] = "SEQ_CLS".into()), "field 'task_type'"),
        (
            "llama-prompt-text",
            "init",
            Box::new(|v| v["prompt_tuning_init"] = "WORDS".into()),
            "field 'prompt_tuning_init'",
        ),
        (
            "qwen2-prefix",
            "subs",
            Box::new(|v| v["num_transformer_submodules"] = 2.into()),
            "num_transformer_submodules",
        ),
        ("qwen2-prefix", "mts", Box::new(|v| v["modules_to_save"] = serde_json::json!(["lm_head"])), "modules_to_save"),
    ];
    for (from, name, edit, want) in cases {
        let dir = edited(tmp.path(), from, name, edit);
        let base = if from.starts_with("qwen2") { "tiny-qwen2" } else { "tiny-llama" };
        let e = load_error(base, &dir);
        let names_file = e.contains("adapter_config.json") || e.contains("adapter_model.safetensors");
        assert!(e.contains(want) && names_file, "{name}: {e}");
    }
    // configurations
    for (cfg, want) in [
        (
            PromptLearningConfig::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: 4,
                prompt_tuning_init: PromptInit::Text,
                prompt_tuning_init_text: None,
            }),
            "prompt_tuning_init_text: required",
        ),
        (
            PromptLearningConfig::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: 4,
                prompt_tuning_init: PromptInit::Random,
                prompt_tuning_init_text: Some("x".into()),
            }),
            "read only with prompt_tuning_init = \"text\"",
        ),
        (
            PromptLearningConfig::PrefixTuning(PrefixTuningConfig {
                num_virtual_tokens: 0,
                prefix_projection: false,
                encoder_hidden_size: None,
            }),
            "num_virtual_tokens",
        ),
        (
            PromptLearningConfig::PrefixTuning(PrefixTuningConfig {
                num_virtual_tokens: 2,
                prefix_projection: false,
                encoder_hidden_size: Some(8),
            }),
            "encoder_hidden_size: read only with prefix_projection = true",
        ),
        (
            PromptLearningConfig::PTuning(PTuningConfig {
                num_virtual_tokens: 2,
                encoder_reparameterization_type: EncoderType::Mlp,
                encoder_hidden_size: None,
                encoder_num_layers: Some(2),
                encoder_dropout: None,
            }),
            "read only with encoder_reparameterization_type = \"lstm\"",
        ),
        (
            PromptLearningConfig::PTuning(PTuningConfig {
                num_virtual_tokens: 2,
                encoder_reparameterization_type: EncoderType::Lstm,
                encoder_hidden_size: None,
                encoder_num_layers: None,
                encoder_dropout: Some(0.1),
            }),
            "encoder_dropout: only 0",
        ),
    ] {
        let mut m = load("tiny-llama");
        let e = attach_prompt_learning(&m.vs, &mut m.lm, &cfg, None).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    // no second attachment, no mixing with LoRA
    let mut m = load("tiny-llama");
    attach_prompt_learning(&m.vs, &mut m.lm, &prefix(false), None).unwrap();
    let e = attach_prompt_learning(&m.vs, &mut m.lm, &prefix(false), None).unwrap_err().to_string();
    assert!(e.contains("already attached"), "{e}");
    let mut m = load("tiny-llama");
    attach_lora(&m.vs, &mut m.lm, &LoraConfig::default()).unwrap();
    let e = attach_prompt_learning(&m.vs, &mut m.lm, &prompt(PromptInit::Random), None).unwrap_err().to_string();
    assert!(e.contains("LoRA adapters are attached"), "{e}");
}
