//! Text generation with a KV cache: batched prompts (left padding), greedy or sampled decoding
//! (temperature, top-k, top-p, repetition penalty), per-sequence stop on any eos id. Finished
//! sequences are dropped from the batch so the remaining ones decode faster. PPO rollouts and the
//! CLI both use this engine.
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::model::decoder::{CausalLm, ForwardOptions, KvCache};

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

/// Applies repetition penalty, temperature, top-k and top-p to `[B, V]` f32 logits and picks
/// one token per row (greedy when temperature is 0).
pub fn next_tokens(logits: &Tensor, history: Option<&Tensor>, cfg: &SamplingConfig) -> Result<Tensor> {
    let mut logits = logits.f_to_kind(Kind::Float)?;
    if let (Some(p), Some(hist)) = (cfg.repetition_penalty, history) {
        if p != 1.0 {
            let seen = logits.f_gather(1, hist, false)?;
            // negative logits are multiplied by the penalty, positive ones divided (as HF)
            let penalised = seen.f_mul_scalar(p)?.f_where_self(&seen.f_lt(0.0)?, &seen.f_div_scalar(p)?)?;
            logits = logits.f_scatter(1, hist, &penalised)?;
        }
    }
    if cfg.temperature <= 0.0 {
        return Ok(logits.f_argmax(-1, false)?);
    }
    logits = logits.f_div_scalar(cfg.temperature)?;
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
    let probs = logits.f_softmax(-1, Kind::Float)?;
    Ok(probs.f_multinomial(1, false)?.f_squeeze_dim(1)?)
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

/// `generate`, also reporting prefill and decode time.
pub fn generate_with_stats(
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
    let plen = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_new = cfg.max_new_tokens;
    let total = (plen + max_new) as i64;
    let mut out: Vec<Generation> = vec![Generation { tokens: Vec::new(), stopped_on_eos: false }; b];
    let mut stats = GenerateStats { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Default::default() };
    if max_new == 0 {
        return Ok((out, stats));
    }
    let started = std::time::Instant::now();

    // Left-padded ids; history (for the repetition penalty) repeats each row's first token in
    // place of padding so padding is never penalised.
    let mut ids = vec![pad_id; b * plen];
    let mut mask = vec![0i64; b * total as usize];
    let mut hist = vec![0i64; b * total as usize];
    for (r, p) in prompts.iter().enumerate() {
        let off = plen - p.len();
        ids[r * plen + off..(r + 1) * plen].copy_from_slice(p);
        for j in 0..total as usize {
            hist[r * total as usize + j] = p[0];
        }
        hist[r * total as usize + off..r * total as usize + plen].copy_from_slice(p);
        for m in &mut mask[r * total as usize + off..r * total as usize + plen] {
            *m = 1;
        }
    }
    let to_dev = |v: &[i64], shape: [i64; 2]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v).f_view(shape)?.f_to_device(device)?)
    };
    let ids = to_dev(&ids, [b as i64, plen as i64])?;
    let mut mask = to_dev(&mask, [b as i64, total])?;
    let mut hist = to_dev(&hist, [b as i64, total])?;
    let use_history = cfg.repetition_penalty.is_some_and(|p| p != 1.0);

    let _guard = tch::no_grad_guard();
    let mut cache = KvCache::new(&lm.config, b as i64, total, lm.kind(), device)?;
    let prompt_mask = mask.f_narrow(1, 0, plen as i64)?;
    let hidden = lm.model.forward(
        &ids,
        &ForwardOptions { attention_mask: Some(&prompt_mask), position_ids: None, segment_ids: None },
        Some(&mut cache),
    )?;
    let mut logits = lm.lm_logits(&hidden.f_narrow(1, plen as i64 - 1, 1)?)?.f_squeeze_dim(1)?;
    let mut positions = crate::model::decoder::positions_from_mask(&prompt_mask)?.f_narrow(1, plen as i64 - 1, 1)?;
    // active[row] = index of that batch row in `prompts`
    let mut active: Vec<usize> = (0..b).collect();
    sync(device);
    stats.prefill_seconds = started.elapsed().as_secs_f64();
    let decode_started = std::time::Instant::now();

    for step in 0..max_new {
        let cur = (plen + step) as i64;
        let hist_now = if use_history { Some(hist.f_narrow(1, 0, cur)?) } else { None };
        let next = next_tokens(&logits, hist_now.as_ref(), cfg)?;
        let next_host: Vec<i64> = Vec::try_from(next.f_to_device(Device::Cpu)?)?;
        let mut keep = Vec::with_capacity(active.len());
        for (row, (&orig, &tok)) in active.iter().zip(&next_host).enumerate() {
            out[orig].tokens.push(tok);
            if eos_ids.contains(&tok) {
                out[orig].stopped_on_eos = true;
            } else {
                keep.push(row as i64);
            }
        }
        if keep.is_empty() || step + 1 == max_new {
            break;
        }
        let mut next = next;
        if keep.len() < active.len() {
            let rows = Tensor::from_slice(&keep).f_to_device(device)?;
            cache.select_rows(&rows)?;
            mask = mask.f_index_select(0, &rows)?;
            hist = hist.f_index_select(0, &rows)?;
            positions = positions.f_index_select(0, &rows)?;
            next = next.f_index_select(0, &rows)?;
            active = keep.iter().map(|&r| active[r as usize]).collect();
        }
        let _ = mask.f_narrow(1, cur, 1)?.f_fill_(1)?;
        if use_history {
            hist.f_narrow(1, cur, 1)?.f_copy_(&next.f_unsqueeze(1)?)?;
        }
        positions = positions.f_add_scalar(1)?;
        let step_mask = mask.f_narrow(1, 0, cur + 1)?;
        let hidden = lm.model.forward(
            &next.f_unsqueeze(1)?,
            &ForwardOptions { attention_mask: Some(&step_mask), position_ids: Some(&positions), segment_ids: None },
            Some(&mut cache),
        )?;
        logits = lm.lm_logits(&hidden)?.f_squeeze_dim(1)?;
    }
    sync(device);
    stats.decode_seconds = decode_started.elapsed().as_secs_f64();
    stats.new_tokens = out.iter().map(|g| g.tokens.len()).sum();
    Ok((out, stats))
}
