//! Next-token loss over labelled token sequences: the objective of pretraining (every token
//! labelled) and SFT (assistant tokens labelled). Batches are right-padded, so causal attention
//! alone keeps padding out of every real position.
use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::infer::logprobs::{shifted_labels, token_logprobs, IGNORE_INDEX};
use crate::model::decoder::{CausalLm, ForwardOptions};
use crate::text::conversation::LabeledTokens;
use crate::train::trainer::{MicroBatch, Objective, Split};

/// Training and validation sequences.
#[derive(Debug, Clone, Default)]
pub struct SequenceSplits {
    pub train: Vec<LabeledTokens>,
    pub validation: Vec<LabeledTokens>,
}

/// Labels that take part in the loss after the causal shift (the first position predicts nothing).
pub fn predicted_labels(seq: &LabeledTokens) -> usize {
    seq.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
}

/// Right-pads sequences into `[B, T]` id and label tensors on `device`.
pub fn pad_batch(seqs: &[&LabeledTokens], pad_id: i64, device: Device) -> Result<(Tensor, Tensor)> {
    let width = seqs.iter().map(|s| s.input_ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id; seqs.len() * width];
    let mut labels = vec![IGNORE_INDEX; seqs.len() * width];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * width..r * width + s.input_ids.len()].copy_from_slice(&s.input_ids);
        labels[r * width..r * width + s.labels.len()].copy_from_slice(&s.labels);
    }
    let shape = [seqs.len() as i64, width as i64];
    Ok((
        Tensor::from_slice(&ids).f_view(shape)?.f_to_device(device)?,
        Tensor::from_slice(&labels).f_view(shape)?.f_to_device(device)?,
    ))
}

/// Summed negative log-likelihood of the labels of `[B, T]` ids under the model; with
/// `chunk_tokens > 0` through [`chunked_summed_nll`].
pub fn summed_nll(lm: &CausalLm, ids: &Tensor, labels: &Tensor, chunk_tokens: usize) -> Result<Tensor> {
    summed_nll_with(lm, ids, labels, &ForwardOptions::default(), chunk_tokens)
}

fn summed_nll_with(
    lm: &CausalLm,
    ids: &Tensor,
    labels: &Tensor,
    opts: &ForwardOptions,
    chunk_tokens: usize,
) -> Result<Tensor> {
    if chunk_tokens > 0 {
        let hidden = lm.model.forward(ids, opts, None)?;
        return chunked_summed_nll(lm, &hidden, labels, chunk_tokens);
    }
    let logits = lm.forward(ids, opts, None)?;
    let (lp, _) = token_logprobs(&logits, labels)?;
    Ok(lp.f_sum(Kind::Float)?.f_neg()?)
}

/// Summed NLL of the (causally shifted) labels of hidden states `[B, T, H]`, the LM head and the
/// loss run over chunks of about `chunk_tokens` positions ([`chunked_head_loss`]) so that the
/// `[B, T, vocab]` logits never exist at once — neither in the forward pass nor in the backward.
/// Equal to the unchunked loss up to f32 summation order.
pub fn chunked_summed_nll(lm: &CausalLm, hidden: &Tensor, labels: &Tensor, chunk_tokens: usize) -> Result<Tensor> {
    let size = hidden.size();
    anyhow::ensure!(
        size.len() == 3 && labels.size() == size[..2],
        "hidden {size:?} and labels {:?} do not match",
        labels.size()
    );
    let shifted = shifted_labels(labels)?;
    chunked_head_loss(lm, hidden, chunk_tokens, |start, logits| {
        let (len, v) = (logits.size()[1], logits.size()[2]);
        let y = shifted.f_narrow(1, start, len)?.f_reshape([-1])?;
        Ok(logits.f_to_kind(Kind::Float)?.f_reshape([-1, v])?.f_cross_entropy_loss::<Tensor>(
            &y,
            None,
            tch::Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        )?)
    })
}

/// A scalar loss summed over the positions of hidden states `[B, T, H]`, computed from their
/// logits chunk by chunk: `chunk_loss(start, logits)` gets the `[B, len, vocab]` logits of
/// positions `start..start+len` (about `chunk_tokens` positions per chunk; 0 = all at once) and
/// returns that chunk's loss. When the hidden states or the head take part in a graph
/// (training), each chunk's gradients with respect to its hidden states and the head weight are
/// taken at once and its logits freed; the returned loss hands them on when it is
/// backpropagated, scaled like any loss: its value is the sum of the chunks' losses and its
/// gradient is theirs. At most one chunk's logits (and what `chunk_loss` makes of them) exist at
/// a time.
pub fn chunked_head_loss(
    lm: &CausalLm,
    hidden: &Tensor,
    chunk_tokens: usize,
    mut chunk_loss: impl FnMut(i64, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let size = hidden.size();
    anyhow::ensure!(size.len() == 3, "chunked_head_loss: hidden states {size:?}, expected [B, T, H]");
    let (b, t) = (size[0], size[1]);
    let device = hidden.device();
    let w = lm.lm_head_weight();
    let (hidden_grad, head_grad) = (hidden.requires_grad(), w.requires_grad());
    let span = if chunk_tokens == 0 { t.max(1) } else { (chunk_tokens as i64 / b.max(1)).max(1) };
    let mut total = Tensor::f_zeros([], (Kind::Float, device))?;
    let mut hidden_grads = Vec::new();
    let mut w_grad: Option<Tensor> = None;
    let mut start = 0;
    while start < t {
        let len = span.min(t - start);
        let piece = hidden.f_narrow(1, start, len)?;
        let h = if hidden_grad { piece.f_detach()?.set_requires_grad(true) } else { piece };
        let loss = chunk_loss(start, &lm.lm_logits(&h)?)?;
        if (hidden_grad || head_grad) && loss.requires_grad() {
            let mut inputs = Vec::new();
            if hidden_grad {
                inputs.push(&h);
            }
            if head_grad {
                inputs.push(w);
            }
            let mut grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)?.into_iter();
            if hidden_grad {
                hidden_grads.push(grads.next().ok_or_else(|| anyhow::anyhow!("no gradient for the hidden states"))?);
            }
            if head_grad {
                let g = grads.next().ok_or_else(|| anyhow::anyhow!("no gradient for the LM head"))?;
                w_grad = Some(match w_grad {
                    Some(acc) => acc.f_add(&g)?,
                    None => g,
                });
            }
        } else if hidden_grad {
            hidden_grads.push(h.f_zeros_like()?);
        }
        total = total.f_add(&loss.f_detach()?.f_to_kind(Kind::Float)?)?;
        start += len;
    }
    if !(hidden_grad || head_grad) {
        return Ok(total);
    }
    // d/dx of (x · g) is g: a zero-valued term that carries the chunks' gradients back
    let mut carrier = Tensor::f_zeros([], (Kind::Float, device))?;
    if hidden_grad {
        carrier = carrier.f_add(&hidden.f_mul(&Tensor::f_cat(&hidden_grads, 1)?)?.f_sum(Kind::Float)?)?;
    }
    if let Some(g) = w_grad {
        carrier = carrier.f_add(&w.f_mul(&g)?.f_sum(Kind::Float)?)?;
    }
    Ok(carrier.f_sub(&carrier.f_detach()?)?.f_add(&total)?)
}

/// The next-token objective over fixed sequences.
pub struct NextTokenObjective<'a> {
    pub lm: &'a CausalLm,
    pub data: SequenceSplits,
    pub pad_id: i64,
    /// `train.loss_chunk_tokens`: the LM head and loss in chunks of this many tokens (0 = at once).
    pub chunk_tokens: usize,
}

impl NextTokenObjective<'_> {
    fn split(&self, split: Split) -> &[LabeledTokens] {
        match split {
            Split::Train => &self.data.train,
            Split::Validation => &self.data.validation,
        }
    }
}

impl Objective for NextTokenObjective<'_> {
    fn len(&self, split: Split) -> usize {
        self.split(split).len()
    }

    fn units(&self, split: Split, example: usize) -> f64 {
        predicted_labels(&self.split(split)[example]) as f64
    }

    fn forward(&mut self, split: Split, examples: &[usize]) -> Result<MicroBatch> {
        let seqs: Vec<&LabeledTokens> = examples.iter().map(|&e| &self.split(split)[e]).collect();
        let tokens = seqs.iter().map(|s| s.input_ids.len()).sum();
        let (ids, labels) = pad_batch(&seqs, self.pad_id, self.lm.device())?;
        let loss_sum = summed_nll(self.lm, &ids, &labels, self.chunk_tokens)?;
        Ok(MicroBatch::new(loss_sum, tokens, Vec::new()))
    }
}

/// Several sequences packed into one row. Attention stays inside each segment and positions
/// restart per segment, so a packed row computes exactly what its sequences compute alone.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedRow {
    pub tokens: LabeledTokens,
    pub segment_ids: Vec<i64>,
    pub position_ids: Vec<i64>,
}

/// Packs sequences, in order, into rows of at most `row_len` tokens (a sequence never spans two
/// rows). The first token of every segment is unlabelled on top of the sequence's own labels:
/// it would otherwise be "predicted" from the previous sequence.
pub fn pack_sequences(seqs: &[LabeledTokens], row_len: usize) -> Vec<PackedRow> {
    let mut rows: Vec<PackedRow> = Vec::new();
    for s in seqs {
        let fits = rows.last().is_some_and(|r| r.tokens.input_ids.len() + s.input_ids.len() <= row_len);
        if !fits {
            rows.push(PackedRow {
                tokens: LabeledTokens { input_ids: Vec::new(), labels: Vec::new() },
                segment_ids: Vec::new(),
                position_ids: Vec::new(),
            });
        }
        let Some(row) = rows.last_mut() else { continue };
        let segment = row.segment_ids.last().map_or(0, |&k| k + 1);
        row.tokens.input_ids.extend_from_slice(&s.input_ids);
        row.tokens.labels.extend_from_slice(&s.labels);
        let start = row.tokens.labels.len() - s.labels.len();
        if start > 0 {
            row.tokens.labels[start] = IGNORE_INDEX;
        }
        row.segment_ids.extend(std::iter::repeat_n(segment, s.input_ids.len()));
        row.position_ids.extend(0..s.input_ids.len() as i64);
    }
    rows
}

/// The next-token objective over packed rows.
pub struct PackedObjective<'a> {
    pub lm: &'a CausalLm,
    pub train: Vec<PackedRow>,
    pub validation: Vec<PackedRow>,
    pub pad_id: i64,
    /// As [`NextTokenObjective::chunk_tokens`].
    pub chunk_tokens: usize,
}

impl PackedObjective<'_> {
    fn rows(&self, split: Split) -> &[PackedRow] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
        }
    }
}

impl Objective for PackedObjective<'_> {
    fn len(&self, split: Split) -> usize {
        self.rows(split).len()
    }

    fn units(&self, split: Split, example: usize) -> f64 {
        predicted_labels(&self.rows(split)[example].tokens) as f64
    }

    fn forward(&mut self, split: Split, examples: &[usize]) -> Result<MicroBatch> {
        let rows: Vec<&PackedRow> = examples.iter().map(|&e| &self.rows(split)[e]).collect();
        let seqs: Vec<&LabeledTokens> = rows.iter().map(|r| &r.tokens).collect();
        let tokens = seqs.iter().map(|s| s.input_ids.len()).sum();
        let device = self.lm.device();
        let (ids, labels) = pad_batch(&seqs, self.pad_id, device)?;
        let width = ids.size()[1] as usize;
        let mut segments = vec![-1i64; rows.len() * width];
        let mut positions = vec![0i64; rows.len() * width];
        for (r, row) in rows.iter().enumerate() {
            segments[r * width..r * width + row.segment_ids.len()].copy_from_slice(&row.segment_ids);
            positions[r * width..r * width + row.position_ids.len()].copy_from_slice(&row.position_ids);
        }
        let shape = [rows.len() as i64, width as i64];
        let segments = Tensor::from_slice(&segments).f_view(shape)?.f_to_device(device)?;
        let positions = Tensor::from_slice(&positions).f_view(shape)?.f_to_device(device)?;
        let opts =
            ForwardOptions { attention_mask: None, position_ids: Some(&positions), segment_ids: Some(&segments) };
        let loss_sum = summed_nll_with(self.lm, &ids, &labels, &opts, self.chunk_tokens)?;
        Ok(MicroBatch::new(loss_sum, tokens, Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn seq(ids: &[i64]) -> LabeledTokens {
        LabeledTokens { input_ids: ids.to_vec(), labels: ids.to_vec() }
    }

    /// The chunked loss equals the unchunked one, and so do the gradients of every parameter
    /// (tied and untied heads): both compute the same sums, only in other groupings, so they agree
    /// to f32 rounding (~1e-7 relative; 1e-5 allowed).
    #[test]
    fn chunked_loss_has_the_loss_and_gradients_of_the_whole_one() {
        for name in ["tiny-llama", "tiny-mistral"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name);
            let m = crate::load_causal_lm(&dir, Device::Cpu, Kind::Float).unwrap();
            let a = seq(&[5, 17, 33, 200, 41, 7, 99, 3, 18]);
            let mut b = seq(&[12, 88, 9, 300, 4, 61]);
            b.labels[1] = IGNORE_INDEX;
            let (ids, labels) = pad_batch(&[&a, &b], 0, Device::Cpu).unwrap();
            let grads = |chunk: usize| {
                for v in m.vs.trainable_variables() {
                    let mut g = v.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                let loss = summed_nll(&m.lm, &ids, &labels, chunk).unwrap();
                (loss.f_mul_scalar(0.5).unwrap()).backward();
                let mut named: Vec<(String, Tensor)> =
                    m.vs.variables().into_iter().map(|(n, v)| (n, v.grad().copy())).collect();
                named.sort_by(|x, y| x.0.cmp(&y.0));
                (loss.double_value(&[]), named)
            };
            let (whole, g0) = grads(0);
            let (chunked, g1) = grads(5);
            assert!((whole - chunked).abs() <= 1e-5 * whole.abs(), "{name}: loss {whole} vs {chunked}");
            for ((n, x), (_, y)) in g0.iter().zip(&g1) {
                let scale = x.norm().double_value(&[]).max(1e-12);
                let diff = (x - y).norm().double_value(&[]);
                assert!(diff <= 1e-5 * scale, "{name}: gradient of {n} differs by {diff} (norm {scale})");
            }
            assert!(g0.iter().any(|(n, _)| n.contains("embed_tokens")), "gradients reach the embeddings");
        }
    }

    #[test]
    fn packing_fills_rows_in_order_and_unlabels_segment_starts() {
        let rows = pack_sequences(&[seq(&[1, 2, 3]), seq(&[4, 5]), seq(&[6, 7, 8, 9])], 5);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].tokens.input_ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(rows[0].tokens.labels, vec![1, 2, 3, IGNORE_INDEX, 5]);
        assert_eq!(rows[0].segment_ids, vec![0, 0, 0, 1, 1]);
        assert_eq!(rows[0].position_ids, vec![0, 1, 2, 0, 1]);
        assert_eq!(rows[1].tokens.input_ids, vec![6, 7, 8, 9]);
    }

    #[test]
    fn a_packed_row_scores_each_sequence_as_if_alone() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-qwen3");
        let m = crate::load_causal_lm(&dir, Device::Cpu, Kind::Float).unwrap();
        let a = seq(&[5, 17, 33, 200, 41]);
        let b = seq(&[12, 88, 9, 300]);
        let alone: f64 = [&a, &b]
            .iter()
            .map(|s| {
                let (ids, labels) = pad_batch(&[s], 0, Device::Cpu).unwrap();
                tch::no_grad(|| summed_nll(&m.lm, &ids, &labels, 0)).unwrap().double_value(&[])
            })
            .sum();
        let rows = pack_sequences(&[a, b], 16);
        assert_eq!(rows.len(), 1);
        let mut obj = PackedObjective { lm: &m.lm, train: rows, validation: Vec::new(), pad_id: 0, chunk_tokens: 0 };
        let packed = tch::no_grad(|| obj.forward(Split::Train, &[0])).unwrap().loss_sum.double_value(&[]);
        // other kernels (one long masked row vs two short ones): equal to f32 rounding of the
        // summed log-probs, ~1e-7 relative
        assert!((alone - packed).abs() <= 1e-5 * alone.abs(), "alone {alone} vs packed {packed}");
        assert_eq!(obj.units(Split::Train, 0), 4.0 + 3.0);
    }
}
