//! Text generation with a KV cache: batched prompts (left padding), greedy or sampled decoding
//! (temperature, top-k, top-p, repetition penalty), per-sequence stop on any eos id. Finished
//! sequences are dropped from the batch so the remaining ones decode faster. PPO rollouts and the
//! CLI use `generate`, which runs a fixed set of prompts through the continuous-batching engine
//! (`infer::engine`) that `align serve` feeds as requests arrive.
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::infer::engine::{Engine, EngineRequest, FinishReason};
use crate::model::decoder::CausalLm;

/// How the next token is chosen.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    /// HF's repetition penalty (> 1 discourages tokens already present); None or 1.0 = off.
    pub repetition_penalty: Option<f64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { max_new_tokens: 64, temperature: 0.0, top_k: None, top_p: None, repetition_penalty: None }
    }
}

/// The new tokens of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, the stopping eos token included when one was produced.
    pub tokens: Vec<i64>,
    /// True when the sequence ended on an eos id (not on `max_new_tokens`).
    pub stopped_on_eos: bool,
}

/// Where the time of one `generate` call went (wall clock, device synchronised).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateStats {
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Prompt tokens processed in the prefill (padding excluded).
    pub prompt_tokens: usize,
    /// Tokens produced, over all sequences.
    pub new_tokens: usize,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// `[B, V]` f32 logits with HF's repetition penalty applied over `history` (`[B, T]` ids).
fn penalised_logits(logits: &Tensor, history: Option<&Tensor>, cfg: &SamplingConfig) -> Result<Tensor> {
    let mut logits = logits.f_to_kind(Kind::Float)?;
    if let (Some(p), Some(hist)) = (cfg.repetition_penalty, history) {
        if p != 1.0 {
            let seen = logits.f_gather(1, hist, false)?;
            // negative logits are multiplied by the penalty, positive ones divided (as HF)
            let penalised = seen.f_mul_scalar(p)?.f_where_self(&seen.f_lt(0.0)?, &seen.f_div_scalar(p)?)?;
            logits = logits.f_scatter(1, hist, &penalised)?;
        }
    }
    Ok(logits)
}

/// The distribution sampling draws from (temperature > 0): `[B, V]` probabilities after the
/// repetition penalty, temperature, top-k and top-p.
pub fn sampling_probs(logits: &Tensor, history: Option<&Tensor>, cfg: &SamplingConfig) -> Result<Tensor> {
    ensure!(cfg.temperature > 0.0, "sampling_probs: greedy decoding has no distribution");
    let mut logits = penalised_logits(logits, history, cfg)?.f_div_scalar(cfg.temperature)?;
    let vocab = logits.size()[1];
    if let Some(k) = cfg.top_k.filter(|&k| k > 0 && k < vocab) {
        let (top, _) = logits.f_topk(k, -1, true, true)?;
        let kth = top.f_narrow(1, k - 1, 1)?;
        logits = logits.f_masked_fill(&logits.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?;
    }
    if let Some(p) = cfg.top_p.filter(|&p| p < 1.0) {
        let (sorted, idx) = logits.f_sort(-1, false)?;
        let cum = sorted.f_softmax(-1, Kind::Float)?.f_cumsum(-1, Kind::Float)?;
        let remove = cum.f_le(1.0 - p)?;
        // always keep the most likely token (the last one in ascending order)
        let _ = remove.f_narrow(1, vocab - 1, 1)?.f_fill_(0)?;
        let remove = remove.f_scatter(1, &idx, &remove)?;
        logits = logits.f_masked_fill(&remove, f64::NEG_INFINITY)?;
    }
    Ok(logits.f_softmax(-1, Kind::Float)?)
}

/// Applies repetition penalty, temperature, top-k and top-p to `[B, V]` f32 logits and picks
/// one token per row (greedy when temperature is 0; sampled from libtorch's global generator).
pub fn next_tokens(logits: &Tensor, history: Option<&Tensor>, cfg: &SamplingConfig) -> Result<Tensor> {
    if cfg.temperature <= 0.0 {
        return Ok(penalised_logits(logits, history, cfg)?.f_argmax(-1, false)?);
    }
    Ok(sampling_probs(logits, history, cfg)?.f_multinomial(1, false)?.f_squeeze_dim(1)?)
}

/// Generates continuations of `prompts` (token ids) in one batch. `pad_id` fills left padding;
/// generation of a sequence stops at any of `eos_ids` or after `max_new_tokens`.
pub fn generate(
    lm: &CausalLm,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    eos_ids: &[i64],
    pad_id: i64,
) -> Result<Vec<Generation>> {
    Ok(generate_with_stats(lm, prompts, cfg, eos_ids, pad_id)?.0)
}

/// `generate`, also reporting prefill and decode time (charged to the training step's generation
/// phase when [`phases`](crate::train::phases) are timed).
pub fn generate_with_stats(
    lm: &CausalLm,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    eos_ids: &[i64],
    pad_id: i64,
) -> Result<(Vec<Generation>, GenerateStats)> {
    let (out, stats) = crate::train::phases::timed(crate::train::phases::Phase::Generation, || {
        generate_untimed(lm, prompts, cfg, eos_ids, pad_id)
    })?;
    crate::train::phases::add_generated_tokens(stats.new_tokens);
    Ok((out, stats))
}

fn generate_untimed(
    lm: &CausalLm,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    eos_ids: &[i64],
    pad_id: i64,
) -> Result<(Vec<Generation>, GenerateStats)> {
    ensure!(!prompts.is_empty(), "generate: no prompts");
    ensure!(prompts.iter().all(|p| !p.is_empty()), "generate: a prompt has no tokens");
    let device = lm.device();
    let b = prompts.len();
    let mut out: Vec<Generation> = vec![Generation { tokens: Vec::new(), stopped_on_eos: false }; b];
    let mut stats = GenerateStats { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Default::default() };
    if cfg.max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let started = std::time::Instant::now();
    let mut engine = Engine::new(lm, pad_id);
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| EngineRequest::new(i as u64, p.clone(), cfg.clone(), eos_ids.to_vec()))
        .collect();
    engine.admit(requests)?;
    sync(device);
    stats.prefill_seconds = started.elapsed().as_secs_f64();
    let decode_started = std::time::Instant::now();
    while !engine.is_idle() {
        for t in engine.step()? {
            let g = &mut out[t.id as usize];
            g.tokens.push(t.token);
            g.stopped_on_eos |= t.finish == Some(FinishReason::Eos);
        }
    }
    sync(device);
    stats.decode_seconds = decode_started.elapsed().as_secs_f64();
    stats.new_tokens = out.iter().map(|g| g.tokens.len()).sum();
    Ok((out, stats))
}
