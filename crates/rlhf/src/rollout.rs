//! Rollouts of the policy-optimisation stages (PPO, GRPO, RLOO, REINFORCE++): the prompts they
//! sample from (rendered, encoded, with their reference answers), batched sampling through the
//! core's KV-cache engine, and the rollouts as tensors — prompts (left-padded) followed by the
//! sampled responses (right-padded) in one `[B, P + R]` batch — with the per-response-token
//! log-probs and values the policy, reference and critic assign to them. Row `i`, column `j` of
//! every `[B, R]` tensor is response token `j` of rollout `i`.
use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use align_core::data::read_prompts;
use align_core::infer::generate::{generate_with_stats, Generation, SamplingConfig};
use align_core::infer::logprobs::{head_logprobs, HeadOptions, HeadScores, IGNORE_INDEX};
use align_core::model::decoder::{CausalLm, ForwardOptions};
use align_core::model::scalar::ScalarModel;
use align_core::text::chat::ChatMessage;
use align_core::train::config::LoadedConfig;
use align_core::train::trainer::{MetricsLog, SAMPLES};
use align_core::ModelTokenizer;

/// A prompt ready for rollouts.
pub struct Prompt {
    pub messages: Vec<ChatMessage>,
    /// The rendered prompt (chat template with the generation prompt).
    pub text: String,
    pub ids: Vec<i64>,
    /// The record's reference answer, when it has one.
    pub reference: Option<String>,
    /// `file:line` of the record.
    pub origin: String,
}

/// Reads the stage's prompt data, renders each prompt with the policy's chat template and a
/// generation prompt and encodes it; drops (and counts) those over `max_len` tokens. The stage's
/// section (`[ppo]`, `[grpo]` …) names `max_prompt_length` in the error when fewer than two fit.
pub fn load_prompts(cfg: &LoadedConfig, tok: &ModelTokenizer, max_len: usize) -> Result<Vec<Prompt>> {
    let options = cfg.data_options()?;
    let data = read_prompts(&cfg.config.data, &options)?;
    let total = data.records.len();
    let mut out = Vec::with_capacity(total);
    for rec in data.records {
        let origin = rec.origin.to_string();
        let text = tok.apply_chat_template(&rec.messages, true).with_context(|| origin.clone())?;
        let ids = tok.encode(&text, false)?;
        if ids.is_empty() || ids.len() > max_len {
            continue;
        }
        out.push(Prompt { messages: rec.messages, text, ids, reference: rec.reference, origin });
    }
    let dropped = total - out.len();
    let stage = &cfg.stage_name;
    tracing::info!("{stage} prompts: {} of {total} kept ({dropped} longer than {max_len} tokens dropped)", out.len());
    if out.len() < 2 {
        bail!(
            "{}: only {} prompt(s) fit [{stage}] max_prompt_length = {max_len} ({dropped} dropped); {stage} needs at least 2",
            cfg.origin.display(),
            out.len()
        );
    }
    Ok(out)
}

/// How each generation call of [`sample_responses`] is seeded: `base` (the step's seed, the
/// loop's `step_seed`) advanced by the index, in the global batch, of the call's first row. The
/// ranks then draw different numbers, and a row's sample does not depend on which rank
/// generates it, provided the rows per call divide each rank's share; `first_row` is the
/// global index of this rank's first prompt. In one process the first call keeps the loop's
/// seed.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSeeds {
    pub base: i64,
    pub first_row: usize,
}

impl ChunkSeeds {
    /// The seed of the call whose first row is global row `row` (`base` itself for row 0).
    pub fn seed(&self, row: usize) -> i64 {
        self.base.wrapping_add((row as i64).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as i64))
    }
}

/// Samples one response to each of `prompts` with the policy (dropout off), `batch` prompts per
/// call of the generation engine (each call seeded by `seeds` when given; otherwise they draw
/// from the RNG as it is). Returns the responses and the seconds it took.
pub fn sample_responses(
    lm: &CausalLm,
    prompts: &[Vec<i64>],
    sampling: &SamplingConfig,
    stops: &[i64],
    pad_id: i64,
    batch: usize,
    seeds: Option<ChunkSeeds>,
) -> Result<(Vec<Generation>, f64)> {
    lm.set_training(false);
    let t = std::time::Instant::now();
    let mut generations = Vec::with_capacity(prompts.len());
    let batch = batch.max(1);
    for (k, chunk) in prompts.chunks(batch).enumerate() {
        if let Some(s) = seeds {
            tch::manual_seed(s.seed(s.first_row + k * batch));
        }
        generations.extend(generate_with_stats(lm, chunk, sampling, stops, pad_id)?.0);
    }
    Ok((generations, t.elapsed().as_secs_f64()))
}

/// `OUTPUT/samples.jsonl` of a rollout stage, opened at the first write (after the loop has
/// prepared the output folder).
pub struct SamplesLog {
    path: Option<std::path::PathBuf>,
    log: Option<MetricsLog>,
}

impl SamplesLog {
    /// Samples every `every` iterations into `output_dir/samples.jsonl` (0 = never).
    pub fn new(output_dir: &std::path::Path, every: u64) -> Self {
        SamplesLog { path: (every > 0).then(|| output_dir.join(SAMPLES)), log: None }
    }

    /// The log when samples are due at (0-based) iteration `step`.
    pub fn due(&mut self, step: u64, every: u64) -> Result<Option<&mut MetricsLog>> {
        if every == 0 || step % every != 0 {
            return Ok(None);
        }
        let Some(path) = &self.path else { return Ok(None) };
        if self.log.is_none() {
            self.log = Some(MetricsLog::open(path)?);
        }
        Ok(self.log.as_mut())
    }
}

/// An iteration's metrics line split into the loop's `loss` and the other metrics, in order.
pub fn loss_and_metrics(line: &serde_json::Map<String, serde_json::Value>) -> (Option<f64>, Vec<(String, f64)>) {
    let loss = line.get("loss").and_then(serde_json::Value::as_f64);
    let metrics = line
        .iter()
        .filter(|(k, _)| k.as_str() != "loss")
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
        .collect();
    (loss, metrics)
}

/// One iteration's prompts and responses, laid out for forward passes.
pub struct RolloutBatch {
    /// `[B, P + R]`: prompt left-padded to `P`, response right-padded to `R`.
    pub input_ids: Tensor,
    /// `[B, P + R]`, 1 on real tokens.
    pub attention_mask: Tensor,
    /// `[B, R]` f32, 1 on response tokens.
    pub response_mask: Tensor,
    /// `P`.
    pub prompt_width: i64,
    /// `R` (≥ 1).
    pub response_width: i64,
}

impl RolloutBatch {
    /// Lays out `prompts[i]` + `generations[i].tokens`; rows with an empty response get one
    /// masked padding token so every row has a response slot.
    pub fn new(prompts: &[Vec<i64>], generations: &[Generation], pad_id: i64, device: Device) -> Result<Self> {
        ensure!(prompts.len() == generations.len() && !prompts.is_empty(), "rollouts: prompts and responses differ");
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let r = generations.iter().map(|g| g.tokens.len()).max().unwrap_or(0).max(1);
        let (b, w) = (prompts.len(), p + r);
        let mut ids = vec![pad_id; b * w];
        let mut mask = vec![0i64; b * w];
        let mut resp = vec![0f32; b * r];
        for (i, (prompt, g)) in prompts.iter().zip(generations).enumerate() {
            let row = i * w;
            let off = p - prompt.len();
            ids[row + off..row + p].copy_from_slice(prompt);
            mask[row + off..row + p].iter_mut().for_each(|m| *m = 1);
            ids[row + p..row + p + g.tokens.len()].copy_from_slice(&g.tokens);
            mask[row + p..row + p + g.tokens.len()].iter_mut().for_each(|m| *m = 1);
            resp[i * r..i * r + g.tokens.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        let shape = [b as i64, w as i64];
        Ok(RolloutBatch {
            input_ids: Tensor::from_slice(&ids).f_view(shape)?.f_to_device(device)?,
            attention_mask: Tensor::from_slice(&mask).f_view(shape)?.f_to_device(device)?,
            response_mask: Tensor::from_slice(&resp).f_view([b as i64, r as i64])?.f_to_device(device)?,
            prompt_width: p as i64,
            response_width: r as i64,
        })
    }

    /// The rows `rows` of the batch (a micro-batch).
    pub fn rows(&self, rows: &[usize]) -> Result<RolloutBatch> {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::from_slice(&idx).f_to_device(self.input_ids.device())?;
        Ok(RolloutBatch {
            input_ids: self.input_ids.f_index_select(0, &idx)?,
            attention_mask: self.attention_mask.f_index_select(0, &idx)?,
            response_mask: self.response_mask.f_index_select(0, &idx)?,
            prompt_width: self.prompt_width,
            response_width: self.response_width,
        })
    }

    /// Runs `f` over the batch in forward passes of `rows_per_pass` rows and concatenates the
    /// `[b, R]` results.
    pub fn per_pass(&self, rows_per_pass: usize, mut f: impl FnMut(&RolloutBatch) -> Result<Tensor>) -> Result<Tensor> {
        let n = self.input_ids.size()[0] as usize;
        let rows: Vec<usize> = (0..n).collect();
        let mut parts = Vec::new();
        for chunk in rows.chunks(rows_per_pass.max(1)) {
            parts.push(f(&self.rows(chunk)?)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    fn options(&self) -> ForwardOptions<'_> {
        ForwardOptions { attention_mask: Some(&self.attention_mask), position_ids: None, segment_ids: None }
    }

    /// Log-probs of the response tokens under `lm` with its logits divided by
    /// `head.temperature` (the distribution they were sampled from), `[B, R]` f32, 0 on padding
    /// (and their entropies when `head.entropy`). Only the positions that predict response
    /// tokens go through the LM head, in chunks of `head.chunk_tokens`.
    pub fn response_scores(&self, lm: &CausalLm, head: HeadOptions) -> Result<HeadScores> {
        let (p, r) = (self.prompt_width, self.response_width);
        let hidden = lm.model.forward(&self.input_ids, &self.options(), None)?;
        // positions P-1 .. P+R-1 predict the response tokens at P .. P+R
        let targets = self.input_ids.f_narrow(1, p - 1, r + 1)?;
        let scored = Tensor::f_cat(
            &[&Tensor::f_ones([targets.size()[0], 1], (Kind::Bool, targets.device()))?, &self.response_mask.f_gt(0.5)?],
            1,
        )?;
        let labels = targets.f_where_scalarother(&scored, IGNORE_INDEX)?;
        head_logprobs(lm, &hidden.f_narrow(1, p - 1, r + 1)?, &labels, head)
    }

    /// [`Self::response_scores`]' log-probs.
    pub fn response_logprobs(&self, lm: &CausalLm, head: HeadOptions) -> Result<Tensor> {
        Ok(self.response_scores(lm, head)?.logprobs)
    }

    /// The critic's value of the state before each response token, `[B, R]` f32, 0 on padding.
    pub fn response_values(&self, critic: &ScalarModel) -> Result<Tensor> {
        let values = critic.forward_all(&self.input_ids, &self.options())?;
        Ok(values.f_narrow(1, self.prompt_width - 1, self.response_width)?.f_mul(&self.response_mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use align_core::model::io::load_causal_lm;
    use std::path::Path;

    fn tiny() -> align_core::LoadedModel {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-qwen2");
        load_causal_lm(&dir, Device::Cpu, Kind::Float).unwrap()
    }

    fn generation(tokens: &[i64]) -> Generation {
        Generation { tokens: tokens.to_vec(), stopped_on_eos: false }
    }

    /// Each row's response log-probs equal those of the unpadded sequence scored alone.
    #[test]
    fn batched_response_logprobs_equal_one_sequence_at_a_time() {
        let m = tiny();
        let prompts = vec![vec![5i64, 9, 11, 40], vec![7i64, 3]];
        let gens = vec![generation(&[12, 13]), generation(&[20, 21, 22])];
        let batch = RolloutBatch::new(&prompts, &gens, 0, Device::Cpu).unwrap();
        assert_eq!((batch.prompt_width, batch.response_width), (4, 3));
        let head = HeadOptions { temperature: 0.7, ..Default::default() };
        let lp = tch::no_grad(|| batch.response_logprobs(&m.lm, head)).unwrap();
        let chunked = HeadOptions { chunk_tokens: 2, ..head };
        let lp_chunked = tch::no_grad(|| batch.response_logprobs(&m.lm, chunked)).unwrap();
        assert!((&lp - &lp_chunked).abs().max().double_value(&[]) < 1e-5);
        for (i, (p, g)) in prompts.iter().zip(&gens).enumerate() {
            let alone = RolloutBatch::new(&[p.clone()], &[g.clone()], 0, Device::Cpu).unwrap();
            let want = tch::no_grad(|| alone.response_logprobs(&m.lm, head)).unwrap();
            let got = lp.get(i as i64).narrow(0, 0, g.tokens.len() as i64);
            let diff = (got - want.get(0)).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "row {i}: {diff}");
            // direct check of one token: log softmax(logits / T) at the prompt's last position
            let ids = Tensor::from_slice(p).view([1, -1]);
            let logits = tch::no_grad(|| m.lm.forward(&ids, &ForwardOptions::default(), None)).unwrap();
            let last = logits.get(0).get(p.len() as i64 - 1).f_div_scalar(0.7).unwrap();
            let expect = last.log_softmax(-1, Kind::Float).double_value(&[g.tokens[0]]);
            assert!((lp.double_value(&[i as i64, 0]) - expect).abs() < 1e-5);
        }
        // padding after the shorter response is 0
        assert_eq!(lp.double_value(&[0, 2]), 0.0);
        assert_eq!(Vec::<f32>::try_from(batch.response_mask.get(0)).unwrap(), vec![1.0, 1.0, 0.0]);
    }
}
