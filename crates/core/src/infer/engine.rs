//! Continuous batching over the one KV cache: requests join the running batch between decode
//! steps (prefilled together, left-padded, then aligned with the running rows at the cache's
//! write position), finished or cancelled ones leave, and each step decodes one token for every
//! running row. `generate` runs a fixed set of prompts through it; `align serve` feeds it
//! requests as they arrive.
//!
//! All rows write their next key/value at one position of the cache (its length). A row that
//! joins is placed so that its prompt ends there; the positions before its start are masked out.
//! When rows leave, the cache drops the positions no running row still reads.
use anyhow::{anyhow, bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::infer::generate::{next_tokens, sampling_probs, SamplingConfig};
use crate::model::decoder::{CausalLm, ForwardOptions, KvCache};

/// OpenAI-style logit adjustments of one request (all off by default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitAdjustments {
    /// Added to the logit of each listed token id.
    pub logit_bias: Vec<(i64, f64)>,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f64,
    /// Subtracted from the logit of every generated token times its count.
    pub frequency_penalty: f64,
}

impl LogitAdjustments {
    fn is_off(&self) -> bool {
        self.logit_bias.is_empty() && self.presence_penalty == 0.0 && self.frequency_penalty == 0.0
    }
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// The caller's id, returned with every token.
    pub id: u64,
    pub prompt: Vec<i64>,
    pub sampling: SamplingConfig,
    /// Generation stops after any of these ids (it is returned).
    pub eos_ids: Vec<i64>,
    /// Seeds this request's own random stream; None: libtorch's global generator.
    pub seed: Option<u64>,
    /// Log-probabilities of each new token and of this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt's tokens after the first, with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// The served adapter (bank number, `lora::load_adapter_bank`); None: the base.
    pub adapter: Option<usize>,
    pub adjustments: LogitAdjustments,
}

impl EngineRequest {
    pub fn new(id: u64, prompt: Vec<i64>, sampling: SamplingConfig, eos_ids: Vec<i64>) -> Self {
        EngineRequest {
            id,
            prompt,
            sampling,
            eos_ids,
            seed: None,
            logprobs: None,
            prompt_logprobs: None,
            adapter: None,
            adjustments: LogitAdjustments::default(),
        }
    }
}

/// A token's log-probability under the model (log-softmax of the raw logits, before sampling
/// adjustments) and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: i64,
    pub logprob: f32,
    /// Most likely tokens at this position, most likely first.
    pub top: Vec<(i64, f32)>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced one of its eos ids.
    Eos,
    /// It reached `max_new_tokens`.
    Length,
}

/// One token decoded for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct StepToken {
    pub id: u64,
    pub token: i64,
    pub logprob: Option<TokenLogprob>,
    /// Set on the request's last token.
    pub finish: Option<FinishReason>,
}

/// A small, fast random stream per request (splitmix64): uniform draws for inverse-CDF sampling.
#[derive(Debug, Clone)]
struct RowRng(u64);

impl RowRng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Row {
    id: u64,
    /// First cache position (real tokens) this row reads.
    start: i64,
    /// RoPE position of the next token fed.
    position: i64,
    /// Prompt and generated tokens (the repetition penalty's history).
    history: Vec<i64>,
    generated: usize,
    sampling: SamplingConfig,
    eos_ids: Vec<i64>,
    rng: Option<RowRng>,
    logprobs: Option<usize>,
    adapter: Option<usize>,
    adjustments: LogitAdjustments,
    /// Generated tokens and their counts (presence / frequency penalties).
    counts: std::collections::BTreeMap<i64, usize>,
    cancelled: bool,
}

/// The running batch of one model.
pub struct Engine<'m> {
    lm: &'m CausalLm,
    pad_id: i64,
    cache: Option<KvCache>,
    rows: Vec<Row>,
    /// Next-token logits of every row, `[rows, vocab]` (f32).
    logits: Option<Tensor>,
    /// Prompt tokens prefilled and tokens decoded so far.
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

impl<'m> Engine<'m> {
    /// An empty batch; `pad_id` fills the left padding of prompts prefilled together.
    pub fn new(lm: &'m CausalLm, pad_id: i64) -> Self {
        Engine { lm, pad_id, cache: None, rows: Vec::new(), logits: None, prompt_tokens: 0, new_tokens: 0 }
    }

    /// Rows running (requests not yet finished).
    pub fn running(&self) -> usize {
        self.rows.len()
    }

    pub fn is_idle(&self) -> bool {
        self.rows.is_empty()
    }

    /// Positions the cache holds now (the longest running row plus the alignment gaps).
    pub fn cache_positions(&self) -> i64 {
        self.cache.as_ref().map_or(0, KvCache::len)
    }

    /// Marks a request to leave the batch before the next step (no more tokens are produced).
    pub fn cancel(&mut self, id: u64) {
        for r in self.rows.iter_mut().filter(|r| r.id == id) {
            r.cancelled = true;
        }
    }

    fn route(&self, adapters: &[Option<usize>]) -> Result<()> {
        if self.lm.model.bank_size() > 0 {
            self.lm.model.set_adapter_rows(Some(adapters))?;
        }
        Ok(())
    }

    /// Prefills `requests` together (one left-padded forward pass) and adds them to the batch;
    /// their first tokens come with the next `step`. Returns the prompt log-probabilities of the
    /// requests that asked for them.
    pub fn admit(&mut self, requests: Vec<EngineRequest>) -> Result<Vec<(u64, Vec<TokenLogprob>)>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let lm = self.lm;
        let device = lm.device();
        let bank = lm.model.bank_size();
        for r in &requests {
            ensure!(!r.prompt.is_empty(), "request {}: the prompt has no tokens", r.id);
            if let Some(a) = r.adapter {
                ensure!(a < bank, "request {}: adapter {a} is not served ({bank} adapters)", r.id);
            }
        }
        let n = requests.len();
        let plen = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let most_new = requests.iter().map(|r| r.sampling.max_new_tokens).max().unwrap_or(0);
        let mut ids = vec![self.pad_id; n * plen];
        let mut mask = vec![0i64; n * plen];
        for (i, r) in requests.iter().enumerate() {
            let off = plen - r.prompt.len();
            ids[i * plen + off..(i + 1) * plen].copy_from_slice(&r.prompt);
            mask[i * plen + off..(i + 1) * plen].fill(1);
        }
        let ids = Tensor::from_slice(&ids).f_view([n as i64, plen as i64])?.f_to_device(device)?;
        let mask = Tensor::from_slice(&mask).f_view([n as i64, plen as i64])?.f_to_device(device)?;
        let _guard = tch::no_grad_guard();
        let mut cache = KvCache::new(&lm.config, n as i64, (plen + most_new.max(1)) as i64, lm.kind(), device)?;
        self.route(&requests.iter().map(|r| r.adapter).collect::<Vec<_>>())?;
        let hidden = lm.model.forward(
            &ids,
            &ForwardOptions { attention_mask: Some(&mask), position_ids: None, segment_ids: None },
            Some(&mut cache),
        )?;
        let last = lm.lm_logits(&hidden.f_narrow(1, plen as i64 - 1, 1)?)?.f_squeeze_dim(1)?.f_to_kind(Kind::Float)?;

        let mut prompt_logprobs = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let Some(top) = r.prompt_logprobs else { continue };
            let off = (plen - r.prompt.len()) as i64;
            let len = r.prompt.len() as i64;
            let mut out = Vec::with_capacity(r.prompt.len().saturating_sub(1));
            if len > 1 {
                let h = hidden.f_narrow(0, i as i64, 1)?.f_narrow(1, off, len - 1)?;
                let logp =
                    lm.lm_logits(&h)?.f_squeeze_dim(0)?.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?;
                let targets = Tensor::from_slice(&r.prompt[1..]).f_to_device(device)?;
                out = logprobs_of(&logp, &targets, top)?;
            }
            prompt_logprobs.push((r.id, out));
        }

        // align the new rows' ends with the running rows' write position
        let mut starts: Vec<i64> = requests.iter().map(|r| (plen - r.prompt.len()) as i64).collect();
        match self.cache.as_mut() {
            None => self.cache = Some(cache),
            Some(main) => {
                let (c, p) = (main.len(), plen as i64);
                if c < p {
                    main.shift(p - c)?;
                    for row in self.rows.iter_mut() {
                        row.start += p - c;
                    }
                } else if c > p {
                    cache.shift(c - p)?;
                    for s in starts.iter_mut() {
                        *s += c - p;
                    }
                }
                main.append_rows(cache)?;
            }
        }
        self.logits = Some(match self.logits.take() {
            Some(l) => Tensor::f_cat(&[&l, &last], 0)?,
            None => last,
        });
        self.prompt_tokens += requests.iter().map(|r| r.prompt.len()).sum::<usize>();
        for (r, start) in requests.into_iter().zip(starts) {
            self.rows.push(Row {
                id: r.id,
                start,
                position: r.prompt.len() as i64,
                generated: 0,
                rng: r.seed.map(RowRng),
                logprobs: r.logprobs,
                adapter: r.adapter,
                adjustments: r.adjustments,
                counts: Default::default(),
                history: r.prompt,
                sampling: r.sampling,
                eos_ids: r.eos_ids,
                cancelled: false,
            });
        }
        self.drop_finished_rows(&self.rows.iter().map(|r| r.sampling.max_new_tokens > 0).collect::<Vec<_>>())?;
        Ok(prompt_logprobs)
    }

    /// Keeps the rows marked true (cache, logits and records), then drops the cache positions no
    /// remaining row reads.
    fn drop_finished_rows(&mut self, keep: &[bool]) -> Result<()> {
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let kept: Vec<i64> = keep.iter().enumerate().filter(|(_, &k)| k).map(|(i, _)| i as i64).collect();
        let mut i = 0;
        self.rows.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        if kept.is_empty() {
            self.cache = None;
            self.logits = None;
            return Ok(());
        }
        let device = self.lm.device();
        let idx = Tensor::from_slice(&kept).f_to_device(device)?;
        if let Some(c) = self.cache.as_mut() {
            c.select_rows(&idx)?;
            let first = self.rows.iter().map(|r| r.start).min().unwrap_or(0);
            if first > 0 {
                c.shift(-first)?;
                for r in self.rows.iter_mut() {
                    r.start -= first;
                }
            }
        }
        if let Some(l) = self.logits.as_ref() {
            self.logits = Some(l.f_index_select(0, &idx)?);
        }
        Ok(())
    }

    /// Picks one token per row from `logits` (f32, raw), each row as its request says.
    fn choose(&mut self, logits: &Tensor) -> Result<Vec<i64>> {
        let device = logits.device();
        let first = self.rows.first().ok_or_else(|| anyhow!("no rows"))?;
        let uniform = self
            .rows
            .iter()
            .all(|r| r.rng.is_none() && r.adjustments.is_off() && same_sampling(&r.sampling, &first.sampling));
        let history = |rows: &[&Row]| -> Result<Tensor> {
            let width = rows.iter().map(|r| r.history.len()).max().unwrap_or(1);
            let mut h = Vec::with_capacity(rows.len() * width);
            for r in rows {
                // padding repeats the row's first token: it is in the history already
                h.extend(std::iter::repeat(r.history[0]).take(width - r.history.len()));
                h.extend_from_slice(&r.history);
            }
            Ok(Tensor::from_slice(&h).f_view([rows.len() as i64, width as i64])?.f_to_device(device)?)
        };
        let penalised = |cfg: &SamplingConfig| cfg.repetition_penalty.is_some_and(|p| p != 1.0);
        if uniform {
            let rows: Vec<&Row> = self.rows.iter().collect();
            let hist = if penalised(&first.sampling) { Some(history(&rows)?) } else { None };
            let next = next_tokens(logits, hist.as_ref(), &first.sampling)?;
            return Ok(Vec::try_from(next.f_to_device(Device::Cpu)?)?);
        }
        let mut out = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter_mut().enumerate() {
            let mut l = logits.f_narrow(0, i as i64, 1)?;
            if !row.adjustments.is_off() {
                l = adjusted(&l, &row.adjustments, &row.counts)?;
            }
            let hist = if penalised(&row.sampling) { Some(history(&[&*row])?) } else { None };
            let token = if row.sampling.temperature <= 0.0 {
                next_tokens(&l, hist.as_ref(), &row.sampling)?.int64_value(&[0])
            } else {
                let probs = sampling_probs(&l, hist.as_ref(), &row.sampling)?;
                match row.rng.as_mut() {
                    None => probs.f_multinomial(1, false)?.int64_value(&[0, 0]),
                    Some(rng) => inverse_cdf(&probs, rng.next_f64())?,
                }
            };
            out.push(token);
        }
        Ok(out)
    }

    /// Decodes one token for every running row; returns them (a row's last one carries why it
    /// finished). Cancelled rows leave first and produce nothing.
    pub fn step(&mut self) -> Result<Vec<StepToken>> {
        let keep: Vec<bool> = self.rows.iter().map(|r| !r.cancelled).collect();
        self.drop_finished_rows(&keep)?;
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let lm = self.lm;
        let device = lm.device();
        let _guard = tch::no_grad_guard();
        let logits = self.logits.take().ok_or_else(|| anyhow!("engine: rows without logits"))?;
        let tokens = self.choose(&logits)?;
        let want_logprobs = self.rows.iter().any(|r| r.logprobs.is_some());
        let logp = if want_logprobs { Some(logits.f_log_softmax(-1, Kind::Float)?) } else { None };
        let mut out = Vec::with_capacity(self.rows.len());
        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, (row, &token)) in self.rows.iter_mut().zip(&tokens).enumerate() {
            let logprob = match (row.logprobs, logp.as_ref()) {
                (Some(top), Some(lp)) => {
                    let t = Tensor::from_slice(&[token]).f_to_device(device)?;
                    logprobs_of(&lp.f_narrow(0, i as i64, 1)?, &t, top)?.pop()
                }
                _ => None,
            };
            row.generated += 1;
            row.history.push(token);
            *row.counts.entry(token).or_default() += 1;
            let finish = if row.eos_ids.contains(&token) {
                Some(FinishReason::Eos)
            } else if row.generated >= row.sampling.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            keep.push(finish.is_none());
            out.push(StepToken { id: row.id, token, logprob, finish });
        }
        self.new_tokens += out.len();
        self.logits = Some(logits);
        self.drop_finished_rows(&keep)?;
        if self.rows.is_empty() {
            return Ok(out);
        }
        let next: Vec<i64> = out.iter().filter(|t| t.finish.is_none()).map(|t| t.token).collect();
        self.route(&self.rows.iter().map(|r| r.adapter).collect::<Vec<_>>())?;
        let cache = self.cache.as_mut().ok_or_else(|| anyhow!("engine: rows without a cache"))?;
        let cursor = cache.len();
        if cursor + 1 > cache.capacity() {
            // grow by doubling, never past what the running rows can still use
            let most = self.rows.iter().map(|r| cursor + (r.sampling.max_new_tokens - r.generated) as i64).max();
            let want = (cache.capacity() * 2).min(most.unwrap_or(cursor + 1)).max(cursor + 1);
            cache.reserve(want)?;
        }
        let b = self.rows.len() as i64;
        let starts = Tensor::from_slice(&self.rows.iter().map(|r| r.start).collect::<Vec<_>>()).f_to_device(device)?;
        let mask = Tensor::f_arange(cursor + 1, (Kind::Int64, device))?
            .f_unsqueeze(0)?
            .f_ge_tensor(&starts.f_unsqueeze(1)?)?
            .f_to_kind(Kind::Int64)?;
        let positions = Tensor::from_slice(&self.rows.iter().map(|r| r.position).collect::<Vec<_>>())
            .f_view([b, 1])?
            .f_to_device(device)?;
        let input = Tensor::from_slice(&next).f_view([b, 1])?.f_to_device(device)?;
        let hidden = lm.model.forward(
            &input,
            &ForwardOptions { attention_mask: Some(&mask), position_ids: Some(&positions), segment_ids: None },
            Some(cache),
        )?;
        self.logits = Some(lm.lm_logits(&hidden)?.f_squeeze_dim(1)?.f_to_kind(Kind::Float)?);
        for r in self.rows.iter_mut() {
            r.position += 1;
        }
        Ok(out)
    }
}

fn same_sampling(a: &SamplingConfig, b: &SamplingConfig) -> bool {
    a.temperature == b.temperature
        && a.top_k == b.top_k
        && a.top_p == b.top_p
        && a.repetition_penalty == b.repetition_penalty
}

/// `[1, V]` logits with the bias added and the presence / frequency penalties subtracted.
fn adjusted(
    logits: &Tensor,
    adj: &LogitAdjustments,
    counts: &std::collections::BTreeMap<i64, usize>,
) -> Result<Tensor> {
    let vocab = logits.size()[1];
    let mut delta: std::collections::BTreeMap<i64, f64> = Default::default();
    for &(t, b) in &adj.logit_bias {
        if (0..vocab).contains(&t) {
            *delta.entry(t).or_default() += b;
        }
    }
    for (&t, &c) in counts {
        if (0..vocab).contains(&t) {
            *delta.entry(t).or_default() -= adj.presence_penalty + adj.frequency_penalty * c as f64;
        }
    }
    if delta.is_empty() {
        return Ok(logits.shallow_clone());
    }
    let (idx, val): (Vec<i64>, Vec<f32>) = delta.into_iter().map(|(t, d)| (t, d as f32)).unzip();
    let device = logits.device();
    let idx = Tensor::from_slice(&idx).f_to_device(device)?.f_unsqueeze(0)?;
    let val = Tensor::from_slice(&val).f_to_device(device)?.f_unsqueeze(0)?;
    Ok(logits.f_scatter_add(1, &idx, &val)?)
}

/// The token where the cumulative probability of `probs` (`[1, V]`) first exceeds `u`·total.
fn inverse_cdf(probs: &Tensor, u: f64) -> Result<i64> {
    let cum = probs.f_cumsum(-1, Kind::Double)?;
    let vocab = probs.size()[1];
    let total = cum.double_value(&[0, vocab - 1]);
    let below = cum.f_lt(u * total)?.f_sum(Kind::Int64)?.int64_value(&[]);
    let mut token = below.min(vocab - 1);
    // never a token the filters removed (rounding at the very end of the distribution)
    if probs.double_value(&[0, token]) <= 0.0 {
        token = probs.f_argmax(-1, false)?.int64_value(&[0]);
    }
    Ok(token)
}

/// Log-probabilities of `targets` (`[N]`) under `logp` (`[N, V]` log-softmax), each with the
/// `top` most likely tokens of its row.
fn logprobs_of(logp: &Tensor, targets: &Tensor, top: usize) -> Result<Vec<TokenLogprob>> {
    let n = targets.size()[0];
    if n == 0 {
        return Ok(Vec::new());
    }
    let chosen: Vec<f32> =
        Vec::try_from(logp.f_gather(1, &targets.f_unsqueeze(1)?, false)?.f_view([n])?.f_to_device(Device::Cpu)?)?;
    let ids: Vec<i64> = Vec::try_from(targets.f_to_device(Device::Cpu)?)?;
    let (top_vals, top_ids) = if top > 0 {
        let k = (top as i64).min(logp.size()[1]);
        let (v, i) = logp.f_topk(k, -1, true, true)?;
        let v: Vec<f32> = Vec::try_from(v.f_reshape([-1])?.f_to_device(Device::Cpu)?)?;
        let i: Vec<i64> = Vec::try_from(i.f_reshape([-1])?.f_to_device(Device::Cpu)?)?;
        (v, i)
    } else {
        (Vec::new(), Vec::new())
    };
    let k = if n > 0 { top_vals.len() / n as usize } else { 0 };
    let mut out = Vec::with_capacity(n as usize);
    for j in 0..n as usize {
        let top = (0..k).map(|c| (top_ids[j * k + c], top_vals[j * k + c])).collect();
        out.push(TokenLogprob { token: ids[j], logprob: chosen[j], top });
    }
    Ok(out)
}

/// Checks a request against the model before it is admitted: prompt not empty, prompt plus new
/// tokens within `context` positions.
pub fn check_fits(prompt_tokens: usize, max_new_tokens: usize, context: usize) -> Result<()> {
    if prompt_tokens == 0 {
        bail!("the prompt has no tokens");
    }
    if prompt_tokens + max_new_tokens > context {
        bail!(
            "the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) is more than the model's context of {context} tokens"
        );
    }
    Ok(())
}
