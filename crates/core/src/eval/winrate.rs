//! Reward-model-judged comparison of two models: each answers the same prompts (greedy), a reward
//! model scores prompt + answer, and the win rate of one over the other comes with a Wilson
//! confidence interval (ties count half).
use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Device, Tensor};

use crate::eval::answers::stop_token_ids;
use crate::infer::generate::{generate, SamplingConfig};
use crate::model::decoder::CausalLm;
use crate::model::scalar::ScalarModel;
use crate::text::chat::ChatMessage;
use crate::text::tokenizer::ModelTokenizer;

/// Wilson score interval of a proportion `p̂ = successes / n` at normal quantile `z`.
pub fn wilson_interval(successes: f64, n: f64, z: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let p = successes / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Greedy answers of `lm` to each prompt (rendered with its chat template + generation prompt).
pub fn answer_prompts(
    lm: &CausalLm,
    tok: &ModelTokenizer,
    prompts: &[Vec<ChatMessage>],
    max_new_tokens: usize,
    batch: usize,
) -> Result<Vec<String>> {
    let stops = stop_token_ids(tok, &lm.config.eos_token_ids);
    let mut encoded = Vec::with_capacity(prompts.len());
    for p in prompts {
        encoded.push(tok.encode(&tok.apply_chat_template(p, true)?, false)?);
    }
    let cfg = SamplingConfig { max_new_tokens, ..Default::default() };
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in encoded.chunks(batch.max(1)) {
        for g in generate(lm, chunk, &cfg, &stops, tok.padding_id())? {
            out.push(tok.decode(&g.tokens, true)?);
        }
    }
    Ok(out)
}

/// Reward-model scores of `prompt + answer` conversations (rendered with the RM's chat template,
/// truncated to `max_length` tokens).
pub fn score_answers(
    rm: &ScalarModel,
    tok: &ModelTokenizer,
    prompts: &[Vec<ChatMessage>],
    answers: &[String],
    max_length: usize,
    batch: usize,
) -> Result<Vec<f64>> {
    let mut seqs = Vec::with_capacity(prompts.len());
    for (p, a) in prompts.iter().zip(answers) {
        let mut conv = p.clone();
        conv.push(ChatMessage::new("assistant", a));
        let mut ids = tok.encode(&tok.apply_chat_template(&conv, false)?, false)?;
        ids.truncate(max_length);
        seqs.push(ids);
    }
    let _guard = tch::no_grad_guard();
    let mut scores = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch.max(1)) {
        let width = chunk.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = vec![rm.pad_token_id; chunk.len() * width];
        for (r, s) in chunk.iter().enumerate() {
            ids[r * width..r * width + s.len()].copy_from_slice(s);
        }
        let t = Tensor::from_slice(&ids).f_view([chunk.len() as i64, width as i64])?.f_to_device(rm.device())?;
        let s: Vec<f64> = Vec::try_from(rm.forward(&t)?.f_to_kind(tch::Kind::Double)?.f_to_device(Device::Cpu)?)?;
        scores.extend(s);
    }
    Ok(scores)
}

/// The comparison of model A against a baseline B.
#[derive(Debug, Clone, Serialize)]
pub struct WinRate {
    pub win_rate: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub prompts: usize,
    pub mean_score_model: f64,
    pub mean_score_baseline: f64,
}

/// Win rate of `a` over `b` from per-prompt scores (ties: equal within `1e-6`, count half), with
/// a 95 % Wilson interval.
pub fn win_rate(a: &[f64], b: &[f64]) -> Result<WinRate> {
    if a.len() != b.len() || a.is_empty() {
        bail!("win rate needs the same, non-zero number of scores on both sides ({} vs {})", a.len(), b.len());
    }
    let (mut wins, mut ties, mut losses) = (0, 0, 0);
    for (x, y) in a.iter().zip(b) {
        if (x - y).abs() <= 1e-6 {
            ties += 1;
        } else if x > y {
            wins += 1;
        } else {
            losses += 1;
        }
    }
    let n = a.len() as f64;
    let successes = wins as f64 + 0.5 * ties as f64;
    let (lo, hi) = wilson_interval(successes, n, 1.959964);
    Ok(WinRate {
        win_rate: successes / n,
        ci_low: lo,
        ci_high: hi,
        wins,
        ties,
        losses,
        prompts: a.len(),
        mean_score_model: a.iter().sum::<f64>() / n,
        mean_score_baseline: b.iter().sum::<f64>() / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_hand_computed_values() {
        // 8 of 10: centre (0.8 + 0.192)/1.384 = 0.7168, half = 1.96·sqrt(0.016 + 0.0096)/1.384 = 0.2266
        let (lo, hi) = wilson_interval(8.0, 10.0, 1.96);
        assert!((lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3, "{lo} {hi}");
        let (lo, hi) = wilson_interval(0.0, 5.0, 1.96);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.4 && hi < 0.44);
    }

    #[test]
    fn ties_count_half() {
        let w = win_rate(&[1.0, 2.0, 3.0, 4.0], &[0.0, 2.0, 5.0, 1.0]).unwrap();
        assert_eq!((w.wins, w.ties, w.losses), (2, 1, 1));
        assert!((w.win_rate - 0.625).abs() < 1e-12);
        assert!(w.ci_low < 0.625 && w.ci_high > 0.625);
        assert!(win_rate(&[1.0], &[]).is_err());
    }
}
