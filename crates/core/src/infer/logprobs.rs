//! Per-token log-probabilities of labels under a model (shift, mask, gather) and the perplexity
//! built on them. Every stage that scores tokens goes through `token_logprobs`.
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use crate::model::decoder::{CausalLm, ForwardOptions};

/// Label value meaning "not scored", as in HF / PyTorch cross-entropy.
pub use crate::text::conversation::IGNORE_INDEX;

/// `[B, T]` labels moved one position left, [`IGNORE_INDEX`] at the end: position `t` is scored
/// against `labels[t + 1]`, and the last position has nothing to predict.
pub fn shifted_labels(labels: &Tensor) -> Result<Tensor> {
    let (b, t) = (labels.size()[0], labels.size()[1]);
    let pad = Tensor::f_full([b, 1], IGNORE_INDEX, (Kind::Int64, labels.device()))?;
    Ok(Tensor::f_cat(&[&labels.f_narrow(1, 1, t - 1)?, &pad], 1)?)
}

/// Log-probabilities of `labels` under `logits` with the causal shift: entry `t` of the result is
/// `log p(labels[t+1] | tokens ..= t)`. Returns `([B, T-1]` f32 log-probs, 0 where ignored;
/// `[B, T-1]` bool mask of scored positions`)`. The labels are shifted (not the logits) and scored
/// with the fused cross-entropy kernel, as transformers does, so no `[B, T, V]` slice, log-softmax
/// or gather temporary is kept for the backward pass beyond the kernel's own.
pub fn token_logprobs(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (ls, ys) = (logits.size(), labels.size());
    ensure!(
        ls.len() == 3 && ys.len() == 2 && ls[..2] == ys[..],
        "token_logprobs: logits {ls:?} and labels {ys:?} do not match"
    );
    let (b, t, v) = (ls[0], ls[1], ls[2]);
    let shifted = shifted_labels(labels)?;
    let nll = logits.f_to_kind(Kind::Float)?.f_view([b * t, v])?.f_cross_entropy_loss::<Tensor>(
        &shifted.f_view([b * t])?,
        None,
        tch::Reduction::None,
        IGNORE_INDEX,
        0.0,
    )?;
    let lp = nll.f_neg()?.f_view([b, t])?.f_narrow(1, 0, t - 1)?;
    let mask = shifted.f_narrow(1, 0, t - 1)?.f_ne(IGNORE_INDEX)?;
    Ok((lp, mask))
}

/// Per-row sums of the labels' log-probabilities and the number of scored labels, both `[B]`
/// f32 (the sequence log-prob of DPO-style losses).
pub fn sequence_logprobs(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (lp, mask) = token_logprobs(logits, labels)?;
    Ok((lp.f_sum_dim_intlist(1, false, Kind::Float)?, mask.f_sum_dim_intlist(1, false, Kind::Float)?))
}

/// Summed negative log-likelihood and number of predicted tokens of one sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequenceNll {
    pub nll: f64,
    pub tokens: i64,
}

/// NLL of each token sequence (every token after the first is predicted), in batches of about
/// `batch_tokens` tokens. Sequences are right-padded, so causal attention alone keeps padding out.
pub fn sequences_nll(lm: &CausalLm, sequences: &[Vec<i64>], batch_tokens: usize) -> Result<Vec<SequenceNll>> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].len()));
    let mut out = vec![SequenceNll { nll: 0.0, tokens: 0 }; sequences.len()];
    let device = lm.device();
    let mut start = 0;
    while start < order.len() {
        let longest = sequences[order[start]].len().max(1);
        let rows = (batch_tokens / longest).max(1).min(order.len() - start);
        let chunk = &order[start..start + rows];
        start += rows;
        if longest < 2 {
            continue; // nothing to predict
        }
        let mut ids = vec![0i64; rows * longest];
        let mut labels = vec![IGNORE_INDEX; rows * longest];
        for (r, &i) in chunk.iter().enumerate() {
            for (j, &tok) in sequences[i].iter().enumerate() {
                ids[r * longest + j] = tok;
                labels[r * longest + j] = tok;
            }
        }
        let shape = [rows as i64, longest as i64];
        let ids = Tensor::from_slice(&ids).f_view(shape)?.f_to_device(device)?;
        let labels = Tensor::from_slice(&labels).f_view(shape)?.f_to_device(device)?;
        let (lp, mask) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            let logits = lm.forward(&ids, &ForwardOptions::default(), None)?;
            token_logprobs(&logits, &labels)
        })?;
        let nll: Vec<f64> =
            Vec::try_from(lp.f_sum_dim_intlist(1, false, Kind::Double)?.f_neg()?.f_to_device(tch::Device::Cpu)?)?;
        let counts: Vec<i64> =
            Vec::try_from(mask.f_sum_dim_intlist(1, false, Kind::Int64)?.f_to_device(tch::Device::Cpu)?)?;
        for (r, &i) in chunk.iter().enumerate() {
            out[i] = SequenceNll { nll: nll[r], tokens: counts[r] };
        }
    }
    Ok(out)
}

/// `exp(total NLL / predicted tokens)` over all sequences.
pub fn perplexity(per_sequence: &[SequenceNll]) -> f64 {
    let nll: f64 = per_sequence.iter().map(|s| s.nll).sum();
    let tokens: i64 = per_sequence.iter().map(|s| s.tokens).sum();
    if tokens == 0 {
        f64::NAN
    } else {
        (nll / tokens as f64).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_log_softmax_gather_and_respects_ignore() {
        tch::manual_seed(0);
        let logits = Tensor::randn([2, 4, 7], (Kind::Float, tch::Device::Cpu));
        let labels = Tensor::from_slice(&[3i64, 1, 6, 0, 2, IGNORE_INDEX, 5, 4]).view([2, 4]);
        let (lp, mask) = token_logprobs(&logits, &labels).unwrap();
        assert_eq!(lp.size(), vec![2, 3]);
        let full = logits.log_softmax(-1, Kind::Float);
        // row 0, position 0 predicts labels[0][1] = 1
        let want = full.double_value(&[0, 0, 1]);
        assert!((lp.double_value(&[0, 0]) - want).abs() < 1e-6);
        let want = full.double_value(&[1, 2, 4]);
        assert!((lp.double_value(&[1, 2]) - want).abs() < 1e-6);
        // ignored label: masked out and zero
        assert!(!bool::try_from(mask.get(1).get(0)).unwrap());
        assert_eq!(lp.double_value(&[1, 0]), 0.0);
        assert_eq!(perplexity(&[SequenceNll { nll: 2.0, tokens: 2 }]), 1f64.exp());
        let (sums, counts) = sequence_logprobs(&logits, &labels).unwrap();
        assert!((sums.double_value(&[1]) - lp.get(1).sum(Kind::Float).double_value(&[])).abs() < 1e-6);
        assert_eq!(Vec::<f32>::try_from(counts).unwrap(), vec![3.0, 2.0]);
    }
}

/// Perplexity of a text corpus, each record tokenised alone as `tokenizer(text)` does.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CorpusPerplexity {
    pub perplexity: f64,
    pub nll: f64,
    pub tokens: i64,
    pub records: usize,
    /// Records longer than `max_length` tokens (truncated).
    pub truncated: usize,
}

/// Scores `texts` (each truncated to `max_length` tokens) and returns the corpus perplexity.
pub fn corpus_perplexity(
    lm: &CausalLm,
    tok: &crate::text::tokenizer::ModelTokenizer,
    texts: &[String],
    max_length: usize,
    batch_tokens: usize,
) -> Result<CorpusPerplexity> {
    let mut seqs = Vec::with_capacity(texts.len());
    let mut truncated = 0;
    for t in texts {
        let mut ids = tok.encode(t, true)?;
        if ids.len() > max_length {
            ids.truncate(max_length);
            truncated += 1;
        }
        seqs.push(ids);
    }
    let per = sequences_nll(lm, &seqs, batch_tokens)?;
    Ok(CorpusPerplexity {
        perplexity: perplexity(&per),
        nll: per.iter().map(|p| p.nll).sum(),
        tokens: per.iter().map(|p| p.tokens).sum(),
        records: texts.len(),
        truncated,
    })
}
