//! The continuous-batching engine (`infer::engine`): requests that join a running batch between
//! decode steps, leave it early or are cancelled give what `generate` gives each of them alone;
//! seeded sampling does not depend on the batch; a bank of LoRA adapters serves each row its
//! own adapter; prompt log-probabilities equal a plain forward pass.
use std::path::{Path, PathBuf};

use align_core::infer::engine::{Engine, EngineRequest, FinishReason, StepToken};
use align_core::infer::generate::{generate, SamplingConfig};
use align_core::model::decoder::ForwardOptions;
use align_core::model::io::load_causal_lm;
use align_core::peft::lora::{load_adapter, load_adapter_bank};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs the engine, admitting `joins[i]` before step `i`, until every request finished; returns
/// each request's tokens (in id order) and finish reasons.
fn run(engine: &mut Engine, mut joins: Vec<Vec<EngineRequest>>, n: usize) -> Vec<(Vec<i64>, Option<FinishReason>)> {
    let mut out = vec![(Vec::new(), None); n];
    let mut step = 0;
    joins.reverse();
    while !(engine.is_idle() && joins.is_empty()) {
        if let Some(group) = joins.pop() {
            engine.admit(group).unwrap();
        }
        for StepToken { id, token, finish, .. } in engine.step().unwrap() {
            out[id as usize].0.push(token);
            out[id as usize].1 = finish;
        }
        step += 1;
        assert!(step < 1000, "the engine does not finish");
    }
    out
}

/// Prompts whose greedy steps never nearly tie on tiny-qwen3 (see golden.rs): batching changes
/// logits by f32 rounding only, so greedy tokens must be equal.
fn prompts() -> Vec<Vec<i64>> {
    vec![vec![5, 17, 33, 200, 41, 9, 77], vec![12, 89], vec![300, 4, 150, 7], vec![64]]
}

#[test]
fn requests_joining_and_leaving_a_running_batch_equal_generate_one_by_one() {
    let m = load_causal_lm(&fixtures().join("models/tiny-qwen3"), Device::Cpu, Kind::Float).unwrap();
    let eos = vec![56, 104];
    let cfg = |n| SamplingConfig { max_new_tokens: n, ..Default::default() };
    let max_new = [16, 12, 16, 5];
    let req = |i: usize| EngineRequest::new(i as u64, prompts()[i].clone(), cfg(max_new[i]), eos.clone());
    // request 1 (2 tokens) first; the 7-token prompt joins later (the running rows move right),
    // the 1-token prompt after that (it moves right to the running rows' end); rows finish on eos
    // and on length at different steps, and the cache drops the positions nobody reads
    let joins = vec![vec![req(1)], vec![], vec![req(0), req(3)], vec![], vec![], vec![req(2)]];
    let mut engine = Engine::new(&m.lm, 0);
    let got = run(&mut engine, joins, 4);
    for (i, (tokens, finish)) in got.iter().enumerate() {
        let alone = generate(&m.lm, &[prompts()[i].clone()], &cfg(max_new[i]), &eos, 0).unwrap();
        assert_eq!(*tokens, alone[0].tokens, "request {i}");
        let want = if alone[0].stopped_on_eos { FinishReason::Eos } else { FinishReason::Length };
        assert_eq!(*finish, Some(want), "request {i}");
    }
    assert!(
        got.iter().any(|g| g.1 == Some(FinishReason::Eos)) && got.iter().any(|g| g.1 == Some(FinishReason::Length))
    );
    assert_eq!(engine.cache_positions(), 0, "an idle engine holds no cache");
}

#[test]
fn cancelled_requests_leave_and_the_others_go_on_unchanged() {
    let m = load_causal_lm(&fixtures().join("models/tiny-qwen3"), Device::Cpu, Kind::Float).unwrap();
    let cfg = SamplingConfig { max_new_tokens: 10, ..Default::default() };
    let mut engine = Engine::new(&m.lm, 0);
    let reqs: Vec<EngineRequest> =
        prompts().into_iter().enumerate().map(|(i, p)| EngineRequest::new(i as u64, p, cfg.clone(), vec![])).collect();
    engine.admit(reqs).unwrap();
    let mut tokens = vec![Vec::new(); 4];
    for step in 0..10 {
        if step == 3 {
            engine.cancel(0);
            engine.cancel(2);
        }
        for t in engine.step().unwrap() {
            tokens[t.id as usize].push(t.token);
        }
    }
    assert!(engine.is_idle());
    assert_eq!((tokens[0].len(), tokens[2].len()), (3, 3), "cancelled rows stop at once");
    for i in [1, 3] {
        let alone = generate(&m.lm, &[prompts()[i].clone()], &cfg, &[], 0).unwrap();
        assert_eq!(tokens[i], alone[0].tokens, "request {i}");
    }
}

#[test]
fn seeded_sampling_depends_on_the_seed_not_on_the_batch() {
    let m = load_causal_lm(&fixtures().join("models/tiny-qwen3"), Device::Cpu, Kind::Float).unwrap();
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: Some(40),
        top_p: Some(0.95),
        ..Default::default()
    };
    let seeded = |id: u64, prompt: Vec<i64>, seed: u64| {
        let mut r = EngineRequest::new(id, prompt, cfg.clone(), vec![]);
        r.seed = Some(seed);
        r
    };
    let p = prompts()[0].clone();
    let mut alone = Engine::new(&m.lm, 0);
    let a = run(&mut alone, vec![vec![seeded(0, p.clone(), 42)]], 1);
    // the same request among others that join and leave, with libtorch's generator moved on
    tch::manual_seed(999);
    let mut busy = Engine::new(&m.lm, 0);
    let joins = vec![
        vec![seeded(1, prompts()[1].clone(), 1)],
        vec![seeded(0, p.clone(), 42), seeded(2, prompts()[2].clone(), 7)],
        vec![seeded(3, prompts()[3].clone(), 42)],
    ];
    let b = run(&mut busy, joins, 4);
    assert_eq!(a[0].0, b[0].0, "a seeded request samples the same tokens in any batch");
    let mut other = Engine::new(&m.lm, 0);
    let c = run(&mut other, vec![vec![seeded(0, p, 43)]], 1);
    assert_ne!(a[0].0, c[0].0, "another seed samples other tokens");
}

#[test]
fn a_bank_of_lora_adapters_serves_each_row_its_own_adapter() {
    let base = fixtures().join("models/tiny-llama");
    let names = ["llama-all", "llama-dora", "llama-qv"];
    let dirs: Vec<PathBuf> = names.iter().map(|n| fixtures().join("peft").join(n)).collect();
    let mut served = load_causal_lm(&base, Device::Cpu, Kind::Float).unwrap();
    load_adapter_bank(&mut served.lm, &dirs).unwrap();
    let prompt: Vec<i64> = vec![3, 14, 15, 92, 65, 35, 89, 79];
    let cfg = SamplingConfig { max_new_tokens: 8, ..Default::default() };
    // the reference of each row: the model with that adapter alone attached (None: the base)
    let reference = |adapter: Option<&Path>| {
        let mut m = load_causal_lm(&base, Device::Cpu, Kind::Float).unwrap();
        if let Some(dir) = adapter {
            load_adapter(&m.vs, &mut m.lm, dir).unwrap();
        }
        let ids = Tensor::from_slice(&prompt).view([1, -1]);
        let logp = tch::no_grad(|| m.lm.forward(&ids, &ForwardOptions::default(), None))
            .unwrap()
            .log_softmax(-1, Kind::Float)
            .squeeze_dim(0);
        let greedy = generate(&m.lm, &[prompt.clone()], &cfg, &[], 0).unwrap().remove(0).tokens;
        (logp, greedy)
    };
    let adapters = [None, Some(0), Some(1), Some(2)];
    let mut engine = Engine::new(&served.lm, 0);
    let reqs: Vec<EngineRequest> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut r = EngineRequest::new(i as u64, prompt.clone(), cfg.clone(), vec![]);
            r.adapter = *a;
            r.prompt_logprobs = Some(1);
            r
        })
        .collect();
    let scored = engine.admit(reqs).unwrap();
    let mut tokens = vec![Vec::new(); adapters.len()];
    while !engine.is_idle() {
        for t in engine.step().unwrap() {
            tokens[t.id as usize].push(t.token);
        }
    }
    let mut distinct = std::collections::BTreeSet::new();
    for (i, a) in adapters.iter().enumerate() {
        let (logp, greedy) = reference(a.map(|a| dirs[a].as_path()));
        let (id, lps) = &scored[i];
        assert_eq!(*id, i as u64);
        for (j, lp) in lps.iter().enumerate() {
            let want = logp.double_value(&[j as i64, prompt[j + 1]]);
            assert!(
                (lp.logprob as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "row {i} position {j}: {} vs {want}",
                lp.logprob
            );
        }
        assert_eq!(tokens[i], greedy, "row {i} ({:?})", a.map(|a| names[a]));
        distinct.insert(lps.iter().map(|l| (l.logprob * 1e4) as i64).collect::<Vec<_>>());
    }
    assert_eq!(distinct.len(), adapters.len(), "every adapter changes the model");
    // a bank refuses adapters that are not LoRA, and the engine adapters it does not serve
    let mut other = load_causal_lm(&base, Device::Cpu, Kind::Float).unwrap();
    let err = load_adapter_bank(&mut other.lm, &[fixtures().join("peft/llama-ia3")]).unwrap_err();
    assert!(format!("{err:#}").contains("IA3"), "{err:#}");
    let err = load_adapter_bank(&mut other.lm, &[fixtures().join("peft/llama-pissa")]).unwrap_err();
    assert!(format!("{err:#}").contains("init_lora_weights"), "{err:#}");
    let mut engine = Engine::new(&served.lm, 0);
    let mut r = EngineRequest::new(0, prompt.clone(), cfg, vec![]);
    r.adapter = Some(3);
    assert!(format!("{:#}", engine.admit(vec![r]).unwrap_err()).contains("not served"));
}

#[test]
fn prompt_and_token_logprobs_equal_a_forward_pass() {
    let m = load_causal_lm(&fixtures().join("models/tiny-qwen3"), Device::Cpu, Kind::Float).unwrap();
    let prompt = prompts()[0].clone();
    let cfg = SamplingConfig { max_new_tokens: 4, ..Default::default() };
    let mut r = EngineRequest::new(0, prompt.clone(), cfg, vec![]);
    r.prompt_logprobs = Some(3);
    r.logprobs = Some(2);
    let mut engine = Engine::new(&m.lm, 0);
    let scored = engine.admit(vec![r]).unwrap().remove(0).1;
    let mut steps = Vec::new();
    while !engine.is_idle() {
        steps.extend(engine.step().unwrap());
    }
    let all: Vec<i64> = prompt.iter().copied().chain(steps.iter().map(|s| s.token)).collect();
    let ids = Tensor::from_slice(&all).view([1, -1]);
    let logp = tch::no_grad(|| m.lm.forward(&ids, &ForwardOptions::default(), None))
        .unwrap()
        .log_softmax(-1, Kind::Float)
        .squeeze_dim(0);
    assert_eq!(scored.len(), prompt.len() - 1);
    let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0);
    for (j, lp) in scored.iter().enumerate() {
        assert_eq!(lp.token, prompt[j + 1]);
        assert!(close(lp.logprob, logp.double_value(&[j as i64, prompt[j + 1]])), "prompt position {j}");
        assert_eq!(lp.top.len(), 3);
        let (best, best_lp) = lp.top[0];
        assert_eq!(best, logp.get(j as i64).argmax(-1, false).int64_value(&[]));
        assert!(close(best_lp, logp.double_value(&[j as i64, best])));
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "most likely first");
    }
    for (k, s) in steps.iter().enumerate() {
        let pos = (prompt.len() - 1 + k) as i64;
        let lp = s.logprob.as_ref().unwrap();
        assert!(close(lp.logprob, logp.double_value(&[pos, s.token])), "new token {k}");
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.top[0].0, s.token, "greedy picks the most likely token");
    }
}
