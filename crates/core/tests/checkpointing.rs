//! Activation checkpointing and chunked LM heads give the gradients of the ordinary backward
//! pass: full tuning, LoRA with dropout (the recomputation replays the same masks), freeze,
//! QLoRA (LoRA on a 4-bit base, whose linears dequantise in their own autograd function),
//! every k-th layer, a scalar-head model, and a nonlinear (DPO-like) loss over chunked token
//! log-probs. Checkpointed runs are compared bitwise with ordinary ones: the recomputation runs
//! the same kernels on the same inputs, so on one machine it gives the same bits.
use std::collections::BTreeMap;

use align_core::infer::logprobs::{head_logprobs, HeadOptions};
use align_core::model::recompute;
use align_core::peft::lora::{attach_lora, trainable_parameters, LoraConfig};
use align_core::train::lm_objective::summed_nll;
use align_core::{load_causal_lm, LoadedModel};
use align_testkit::{rng_lock, tiny_model};
use tch::{Device, Kind, Tensor};

fn model(method: &str) -> LoadedModel {
    let mut m = load_causal_lm(&tiny_model("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
    match method {
        "full" => {
            for (_, v) in m.vs.variables() {
                let _ = v.set_requires_grad(true);
            }
        }
        "lora" | "qlora" => {
            if method == "qlora" {
                let q = align_core::model::quant::Quantization::FourBit {
                    quant_type: align_core::model::quant::QuantType4::Nf4,
                    double_quant: true,
                };
                m.lm.model.quantize(&m.vs, q).unwrap();
            }
            tch::manual_seed(1);
            let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.2, ..Default::default() };
            attach_lora(&m.vs, &mut m.lm, &cfg).unwrap();
            // B starts at zero: give it values so every adapter weight gets a gradient
            tch::no_grad(|| {
                for (name, mut v) in m.vs.variables() {
                    if name.contains("lora_B") {
                        let _ = v.copy_(&(Tensor::randn_like(&v) * 0.05));
                    }
                }
            });
        }
        "freeze" => {
            for (name, v) in m.vs.variables() {
                let _ = v.set_requires_grad(name.starts_with("model.layers.1."));
            }
        }
        other => panic!("{other}"),
    }
    m.lm.set_training(true);
    m
}

fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[5i64, 17, 33, 200, 41, 9, 77, 12, 3, 150, 61, 8, 240, 19, 4, 90]).view([2, 8]);
    let labels = ids.copy();
    let _ = labels.get(1).narrow(0, 0, 3).fill_(-100);
    (ids, labels)
}

/// Gradients of every trainable parameter after `loss` (a closure building the loss) and
/// `recompute::backward`, with checkpointing every `every` layers (0 = off).
fn grads(m: &LoadedModel, every: usize, seed: i64, loss: impl Fn(&LoadedModel) -> Tensor) -> BTreeMap<String, Tensor> {
    let params = trainable_parameters(&m.vs);
    for (_, p) in &params {
        p.shallow_clone().zero_grad();
    }
    m.lm.model.set_gradient_checkpointing(every);
    tch::manual_seed(seed);
    let l = loss(m);
    // a layer with nothing to differentiate (frozen, input without gradient) defers nothing
    let trainable_layer0 = m.vs.variables().iter().any(|(n, v)| n.starts_with("model.layers.0.") && v.requires_grad());
    if every > 0 && trainable_layer0 {
        assert!(recompute::pending() > 0, "a checkpointed training forward defers its layers");
    }
    recompute::backward(&l).unwrap();
    assert_eq!(recompute::pending(), 0);
    // what follows the step draws the same numbers either way
    let after = Tensor::randint(1 << 40, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
    let mut out: BTreeMap<String, Tensor> = params.into_iter().map(|(n, p)| (n, p.grad().copy())).collect();
    out.insert("__rng_after".into(), Tensor::from_slice(&[after]));
    out.insert("__loss".into(), l.detach().copy());
    out
}

fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut nonzero = 0;
    for (name, g) in a {
        assert!(g.defined() && b[name].defined(), "{what}: {name} has no gradient");
        assert!(g.equal(&b[name]), "{what}: {name} differs by {}", (g - &b[name]).abs().max().double_value(&[]));
        if g.abs().max().double_value(&[]) > 0.0 {
            nonzero += 1;
        }
    }
    assert!(nonzero > 3, "{what}: gradients are zero");
}

fn nll(m: &LoadedModel, chunk: usize) -> Tensor {
    let (ids, labels) = batch();
    summed_nll(&m.lm, &ids, &labels, chunk).unwrap()
}

#[test]
fn checkpointed_gradients_equal_the_ordinary_ones_bitwise() {
    let _turn = rng_lock();
    for method in ["full", "lora", "freeze", "qlora"] {
        let m = model(method);
        let plain = grads(&m, 0, 11, |m| nll(m, 0));
        for every in [1, 2] {
            let ckpt = grads(&m, every, 11, |m| nll(m, 0));
            assert_same(&plain, &ckpt, &format!("{method}, every {every}"));
        }
        // with the chunked loss as well
        let plain = grads(&m, 0, 12, |m| nll(m, 4));
        assert_same(&plain, &grads(&m, 1, 12, |m| nll(m, 4)), &format!("{method}, chunked loss"));
    }
}

#[test]
fn lora_dropout_is_replayed_in_the_recomputation() {
    let _turn = rng_lock();
    let m = model("lora");
    // dropout is on: two seeds give different gradients, the same seed the same ones
    let a = grads(&m, 1, 21, |m| nll(m, 0));
    let b = grads(&m, 1, 22, |m| nll(m, 0));
    let name = a.keys().find(|k| k.contains("lora_A")).unwrap();
    assert!(!a[name].equal(&b[name]), "dropout masks did not change with the seed");
    assert_same(&a, &grads(&m, 0, 21, |m| nll(m, 0)), "lora dropout");
}

#[test]
fn chunked_token_logprobs_give_the_gradients_of_a_nonlinear_loss() {
    let _turn = rng_lock();
    // a DPO-like loss: -logsigmoid(β (Σ logp(row 0) - Σ logp(row 1)))
    let loss = |chunk: usize| {
        move |m: &LoadedModel| {
            let (ids, labels) = batch();
            let hidden = m.lm.model.forward(&ids, &Default::default(), None).unwrap();
            let opts = HeadOptions { chunk_tokens: chunk, ..Default::default() };
            let s = head_logprobs(&m.lm, &hidden, &labels, opts).unwrap();
            let sums = s.logprobs.sum_dim_intlist(1, false, Kind::Float);
            let margin = (sums.get(0) - sums.get(1)) * 0.1;
            -margin.log_sigmoid()
        }
    };
    for method in ["full", "lora"] {
        let m = model(method);
        let plain = grads(&m, 0, 31, loss(0));
        for (every, chunk) in [(0, 3), (1, 3), (1, 0), (2, 5)] {
            let other = grads(&m, every, 31, loss(chunk));
            assert_eq!(plain.keys().collect::<Vec<_>>(), other.keys().collect::<Vec<_>>());
            for (name, g) in &plain {
                let o = &other[name];
                if chunk == 0 || name.starts_with("__rng") {
                    assert!(g.equal(o), "{method} every {every} chunk {chunk}: {name} differs");
                    continue;
                }
                // chunks multiply smaller matrices: equal up to the kernels' summation order
                let scale = g.abs().max().double_value(&[]).max(1e-12);
                let diff = (g - o).abs().max().double_value(&[]) / scale;
                assert!(diff < 1e-5, "{method} every {every} chunk {chunk}: {name} differs by {diff:e} (relative)");
            }
        }
    }
}

#[test]
fn entropy_and_values_of_the_chunked_head_equal_the_unchunked() {
    let m = load_causal_lm(&tiny_model("tiny-qwen2"), Device::Cpu, Kind::Float).unwrap();
    let (ids, labels) = batch();
    tch::no_grad(|| {
        let hidden = m.lm.model.forward(&ids, &Default::default(), None).unwrap();
        let a = head_logprobs(&m.lm, &hidden, &labels, HeadOptions { entropy: true, ..Default::default() }).unwrap();
        let opts = HeadOptions { entropy: true, chunk_tokens: 6, temperature: 1.0 };
        let b = head_logprobs(&m.lm, &hidden, &labels, opts).unwrap();
        assert!((&a.logprobs - &b.logprobs).abs().max().double_value(&[]) < 1e-5);
        assert!(a.mask.equal(&b.mask));
        let (ea, eb) = (a.entropy.unwrap(), b.entropy.unwrap());
        assert_eq!(ea.size(), vec![2, 7]);
        assert!((&ea - &eb).abs().max().double_value(&[]) < 1e-5);
        // entropy of a distribution over V tokens lies in [0, ln V]
        let v = m.lm.config.vocab_size as f64;
        assert!(ea.min().double_value(&[]) >= 0.0 && ea.max().double_value(&[]) <= v.ln() + 1e-4);
    });
    assert_eq!(recompute::pending(), 0, "no graph, nothing deferred");
}

#[test]
fn a_scalar_head_model_checkpoints_too() {
    let _turn = rng_lock();
    let spec = align_core::load::spec::ModelSpec::at(&tiny_model("tiny-llama"), None, Device::Cpu, Kind::Float);
    let (loaded, _) = spec.scalar_model_to_train(|_| align_core::model::scalar::ScoreInit::Zeros).unwrap();
    for (_, v) in loaded.vs.variables() {
        let _ = v.set_requires_grad(true);
    }
    let (ids, _) = batch();
    let run = |every: usize| {
        for (_, mut v) in loaded.vs.variables() {
            v.zero_grad();
        }
        loaded.rm.model.set_gradient_checkpointing(every);
        let scores = loaded.rm.forward_all(&ids, &Default::default()).unwrap();
        recompute::backward(&scores.square().sum(Kind::Float)).unwrap();
        loaded.vs.variables().into_iter().map(|(n, v)| (n, v.grad().copy())).collect::<BTreeMap<_, _>>()
    };
    // a zero head gives the trunk no gradient: give it one first
    tch::no_grad(|| {
        let mut w = loaded.vs.variables()["score.weight"].shallow_clone();
        let _ = w.copy_(&(Tensor::randn_like(&w) * 0.1));
    });
    let (a, b) = (run(0), run(1));
    for (name, g) in &a {
        assert!(g.equal(&b[name]), "{name} differs");
    }
    assert!(a["model.layers.0.self_attn.q_proj.weight"].abs().max().double_value(&[]) > 0.0);
}
