//! Per-token log-probabilities of labels under a model (shift, mask, gather) and the perplexity
//! built on them. Every stage that scores tokens goes through `token_logprobs`.
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use crate::model::decoder::{CausalLm, ForwardOptions};
use crate::model::recompute;

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

/// How the LM head scores hidden states ([`head_logprobs`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadOptions {
    /// Logits are divided by this before the softmax (1 = as they are).
    pub temperature: f64,
    /// `train.loss_chunk_tokens`: the head runs over chunks of about this many tokens, so the
    /// `[B, T, vocab]` logits never exist at once, in the forward pass nor the backward (0 = all
    /// at once).
    pub chunk_tokens: usize,
    /// Also return each position's entropy (a metric: no gradient).
    pub entropy: bool,
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions { temperature: 1.0, chunk_tokens: 0, entropy: false }
    }
}

/// What [`head_logprobs`] returns, each `[B, T-1]` f32 over the causally shifted labels.
pub struct HeadScores {
    /// `log p(labels[t+1] | ..= t)`, 0 where ignored.
    pub logprobs: Tensor,
    /// Scored positions.
    pub mask: Tensor,
    /// The entropy of each position's distribution (detached), when asked for.
    pub entropy: Option<Tensor>,
}

/// Token log-probs of `labels` under the LM head applied to `hidden` (`[B, T, H]`), as
/// [`token_logprobs`] of the logits. With `chunk_tokens > 0` the head runs chunk by chunk
/// without a graph and, when gradients are wanted, the log-probs are a leaf whose backward is
/// deferred ([`recompute::backward`]): each chunk's logits are recomputed and its gradient
/// passed on to the hidden states and the head, one chunk at a time. Equal to the unchunked
/// values up to the matrix kernels' summation order.
pub fn head_logprobs(lm: &CausalLm, hidden: &Tensor, labels: &Tensor, opts: HeadOptions) -> Result<HeadScores> {
    let (hs, ys) = (hidden.size(), labels.size());
    ensure!(
        hs.len() == 3 && ys.len() == 2 && hs[..2] == ys[..] && hs[1] >= 1,
        "head_logprobs: hidden {hs:?} and labels {ys:?} do not match"
    );
    let (b, t) = (hs[0], hs[1]);
    let w = lm.lm_head_weight();
    if opts.chunk_tokens == 0 {
        let logits = head_logits(w, hidden, opts.temperature)?;
        let (logprobs, mask) = token_logprobs(&logits, labels)?;
        let entropy =
            if opts.entropy { Some(tch::no_grad(|| entropy_of(&logits.f_narrow(1, 0, t - 1)?))?) } else { None };
        return Ok(HeadScores { logprobs, mask, entropy });
    }
    let shifted = shifted_labels(labels)?;
    let span = (opts.chunk_tokens as i64 / b.max(1)).max(1);
    let chunks: Vec<(i64, i64)> = (0..t).step_by(span as usize).map(|s| (s, span.min(t - s))).collect();
    let (mut lps, mut ents) = (Vec::new(), Vec::new());
    tch::no_grad(|| -> Result<()> {
        for &c in &chunks {
            let (lp, logits) = chunk_logprobs(w, hidden, &shifted, c, opts.temperature)?;
            lps.push(lp);
            if opts.entropy {
                ents.push(entropy_of(&logits)?);
            }
        }
        Ok(())
    })?;
    let logprobs = Tensor::f_cat(&lps, 1)?.f_narrow(1, 0, t - 1)?;
    let mask = shifted.f_narrow(1, 0, t - 1)?.f_ne(IGNORE_INDEX)?;
    let entropy = if opts.entropy { Some(Tensor::f_cat(&ents, 1)?.f_narrow(1, 0, t - 1)?) } else { None };
    let wants_grad = recompute::grad_enabled() && (hidden.requires_grad() || w.requires_grad());
    if !wants_grad {
        return Ok(HeadScores { logprobs, mask, entropy });
    }
    let logprobs = logprobs.f_contiguous()?.set_requires_grad(true);
    let (hidden, w, temperature) = (hidden.shallow_clone(), w.shallow_clone(), opts.temperature);
    recompute::defer(vec![logprobs.shallow_clone()], move |grads| {
        // position T-1 predicts nothing: its gradient is 0
        let g = Tensor::f_cat(&[&grads[0], &Tensor::f_zeros([b, 1], (Kind::Float, grads[0].device()))?], 1)?;
        let leaf = hidden.f_detach()?.set_requires_grad(hidden.requires_grad());
        for &c in &chunks {
            let (lp, _) = chunk_logprobs(&w, &leaf, &shifted, c, temperature)?;
            recompute::backprop(&[lp], &[g.f_narrow(1, c.0, c.1)?])?;
        }
        if hidden.requires_grad() {
            recompute::backprop(&[hidden], &[leaf.grad()])?;
        }
        Ok(())
    });
    Ok(HeadScores { logprobs, mask, entropy })
}

/// `hidden · Wᵀ / temperature`.
fn head_logits(w: &Tensor, hidden: &Tensor, temperature: f64) -> Result<Tensor> {
    let z = hidden.f_linear::<Tensor>(w, None)?;
    Ok(if temperature > 0.0 && temperature != 1.0 { z.f_div_scalar(temperature)? } else { z })
}

/// Log-probs `[B, len]` of the shifted labels at positions `start..start+len`, and their logits.
fn chunk_logprobs(
    w: &Tensor,
    hidden: &Tensor,
    shifted: &Tensor,
    (start, len): (i64, i64),
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let logits = head_logits(w, &hidden.f_narrow(1, start, len)?, temperature)?;
    let (b, v) = (logits.size()[0], logits.size()[2]);
    let y = shifted.f_narrow(1, start, len)?.f_reshape([-1])?;
    let nll = logits.f_to_kind(Kind::Float)?.f_reshape([-1, v])?.f_cross_entropy_loss::<Tensor>(
        &y,
        None,
        tch::Reduction::None,
        IGNORE_INDEX,
        0.0,
    )?;
    Ok((nll.f_neg()?.f_view([b, len])?, logits))
}

/// Entropy of each position's softmax over `[B, T, V]` logits, `[B, T]` f32.
fn entropy_of(logits: &Tensor) -> Result<Tensor> {
    let lsm = logits.f_log_softmax(-1, Kind::Float)?;
    Ok(lsm.f_exp()?.f_mul(&lsm)?.f_sum_dim_intlist(-1, false, Kind::Float)?.f_neg()?)
}

impl HeadScores {
    /// Per-row sums of the labels' log-probabilities and the number of scored labels, both `[B]`
    /// f32 (the sequence log-prob of DPO-style losses).
    pub fn sequence_sums(&self) -> Result<(Tensor, Tensor)> {
        let sums = self.logprobs.f_sum_dim_intlist(1, false, Kind::Float)?;
        Ok((sums, self.mask.f_sum_dim_intlist(1, false, Kind::Float)?))
    }
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
        let scores = HeadScores { logprobs: lp.shallow_clone(), mask: mask.shallow_clone(), entropy: None };
        let (sums, counts) = scores.sequence_sums().unwrap();
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
