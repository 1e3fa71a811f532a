//! SFT under each tuning method: LoRA saves PEFT adapters and resumes exactly, freeze trains only
//! what it selects, and labels cover assistant turns only.
use std::path::Path;

use align_core::train::config::LoadedConfig;
use align_testkit::{losses as testkit_losses, rng_lock, sample_data, stage_config, tiny_model};
use tch::{Device, Kind};

fn config(out: &Path, extra: &[&str]) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 1e-2\nmax_length = 96\nsave_every = 2\n",
        tiny_model("tiny-llama"),
        sample_data("sft/medical_sharegpt.jsonl"),
        out
    );
    stage_config(&text, "sft", extra)
}

fn losses(out: &Path) -> Vec<f64> {
    testkit_losses(out).into_iter().map(|(_, l)| l).collect()
}

#[test]
fn lora_run_saves_peft_adapters_and_resumes_exactly() {
    let _turn = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let lora = ["method=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"];
    let straight = tmp.path().join("straight");
    align_sft::run(&config(&straight, &lora), false, None).unwrap();
    let resumed = tmp.path().join("resumed");
    align_sft::run(&config(&resumed, &lora), false, Some(3)).unwrap();
    align_sft::run(&config(&resumed, &lora), false, None).unwrap();
    for d in [&straight, &resumed] {
        assert!(d.join("final/adapter_config.json").is_file() && d.join("final/adapter_model.safetensors").is_file());
        assert!(!d.join("final/model.safetensors").exists(), "a LoRA run saves the adapter, not the base");
    }
    let a = std::fs::read(straight.join("final/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/adapter_model.safetensors")).unwrap();
    assert!(a == b, "adapter weights differ after stop + resume (dropout RNG and data order must be restored)");
    assert_eq!(losses(&straight), losses(&resumed));
    // the adapter changes the model: base + adapter logits differ from the base's
    let base = align_core::load_causal_lm(&tiny_model("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
    let mut tuned = align_core::load_causal_lm(&tiny_model("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
    align_core::peft::lora::load_adapter(&tuned.vs, &mut tuned.lm, &straight.join("final")).unwrap();
    let ids = tch::Tensor::from_slice(&[5i64, 17, 33, 200, 41]).view([1, 5]);
    let l0 = tch::no_grad(|| base.lm.forward(&ids, &Default::default(), None)).unwrap();
    let l1 = tch::no_grad(|| tuned.lm.forward(&ids, &Default::default(), None)).unwrap();
    assert!((&l0 - &l1).abs().max().double_value(&[]) > 1e-3);
}

#[test]
fn freeze_trains_only_the_selected_parameters() {
    let _turn = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("freeze");
    align_sft::run(&config(&out, &["method=freeze", "freeze.last_layers=1", "train.max_steps=2"]), false, None)
        .unwrap();
    let base = align_core::load_causal_lm(&tiny_model("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
    let tuned = align_core::load_causal_lm(&out.join("final"), Device::Cpu, Kind::Float).unwrap();
    let vars = tuned.vs.variables();
    for (name, t) in base.vs.variables() {
        let changed = !t.equal(&vars[&name]);
        assert_eq!(changed, name.starts_with("model.layers.1."), "{name}: changed = {changed}");
    }
}

#[test]
fn packed_sft_trains_on_fewer_longer_rows() {
    let _turn = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("packed");
    let s =
        align_sft::run(&config(&out, &["sft.packing=true", "train.max_length=256", "train.max_steps=8"]), false, None)
            .unwrap();
    assert!(s.completed);
    let l = losses(&out);
    assert_eq!(l.len(), 8);
    assert!(l.iter().all(|x| x.is_finite()));
    assert!(l[7] < l[0], "packed SFT loss did not go down: {l:?}");
}

/// `train.gradient_checkpointing` recomputes layers in the backward pass: full tuning and LoRA
/// (with dropout) train to the same bytes as without it, every layer or every second one.
#[test]
fn gradient_checkpointing_trains_to_the_same_weights() {
    let _turn = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let lora = ["method=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"];
    for (method, extra) in [("full", &[][..]), ("lora", &lora[..])] {
        let run = |name: &str, more: &[&str]| {
            let out = tmp.path().join(format!("{method}-{name}"));
            let sets: Vec<&str> = extra.iter().chain(more).chain(&["train.max_steps=3"]).copied().collect();
            align_sft::run(&config(&out, &sets), false, None).unwrap();
            out
        };
        let plain = run("plain", &[]);
        let file = if method == "lora" { "final/adapter_model.safetensors" } else { "final/model.safetensors" };
        for (name, more) in [
            ("every", &["train.gradient_checkpointing=true"][..]),
            ("second", &["train.gradient_checkpointing=true", "train.gradient_checkpointing_every=2"][..]),
        ] {
            let ckpt = run(name, more);
            assert_eq!(losses(&plain), losses(&ckpt), "{method} {name}");
            assert!(
                std::fs::read(plain.join(file)).unwrap() == std::fs::read(ckpt.join(file)).unwrap(),
                "{method} {name}: weights differ with gradient checkpointing"
            );
        }
    }
}

/// QLoRA: LoRA on the 4-bit (NF4, double quantisation) base trains (the loss falls), saves a
/// PEFT adapter only, and resumes bitwise; the saved adapter differs from plain LoRA's (the
/// base it trained on is the quantised one).
#[test]
fn qlora_run_trains_on_the_quantised_base_and_resumes_exactly() {
    let _turn = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let qlora = [
        "method=lora",
        "lora.r=8",
        "lora.alpha=16",
        "lora.dropout=0.1",
        "train.quantize=nf4",
        "train.double_quant=true",
        "train.max_steps=12",
        "train.lr=3e-2",
    ];
    let straight = tmp.path().join("straight");
    align_sft::run(&config(&straight, &qlora), false, None).unwrap();
    let resumed = tmp.path().join("resumed");
    align_sft::run(&config(&resumed, &qlora), false, Some(5)).unwrap();
    align_sft::run(&config(&resumed, &qlora), false, None).unwrap();
    let final_dir = straight.join("final");
    assert!(final_dir.join("adapter_model.safetensors").is_file() && !final_dir.join("model.safetensors").exists());
    let a = std::fs::read(final_dir.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/adapter_model.safetensors")).unwrap();
    assert!(a == b, "QLoRA adapter weights differ after stop + resume");
    let l = losses(&straight);
    assert_eq!(l, losses(&resumed));
    let (first, last) = (l[..3].iter().sum::<f64>() / 3.0, l[l.len() - 3..].iter().sum::<f64>() / 3.0);
    assert!(last < first - 0.3, "QLoRA loss did not fall: first {first:.3}, last {last:.3}");
    // the same run on the full-precision base trains other adapter weights
    let plain = tmp.path().join("plain");
    let lora: Vec<&str> = qlora
        .iter()
        .copied()
        .filter(|s| !s.starts_with("train.quantize") && !s.starts_with("train.double_quant"))
        .collect();
    align_sft::run(&config(&plain, &lora), false, None).unwrap();
    assert!(std::fs::read(plain.join("final/adapter_model.safetensors")).unwrap() != a);
}
