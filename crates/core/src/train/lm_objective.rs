//! Next-token loss over labelled token sequences: the objective of pretraining (every token
//! labelled) and SFT (assistant tokens labelled). Batches are right-padded, so causal attention
//! alone keeps padding out of every real position.
use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::infer::logprobs::{token_logprobs, IGNORE_INDEX};
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

/// Summed negative log-likelihood of the labels of `[B, T]` ids under the model.
pub fn summed_nll(lm: &CausalLm, ids: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logits = lm.forward(ids, &ForwardOptions::default(), None)?;
    let (lp, _) = token_logprobs(&logits, labels)?;
    Ok(lp.f_sum(Kind::Float)?.f_neg()?)
}

/// The next-token objective over fixed sequences.
pub struct NextTokenObjective<'a> {
    pub lm: &'a CausalLm,
    pub data: SequenceSplits,
    pub pad_id: i64,
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
        Ok(MicroBatch { loss_sum: summed_nll(self.lm, &ids, &labels)?, tokens, metrics: Vec::new() })
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
        let logits = self.lm.forward(&ids, &opts, None)?;
        let (lp, _) = token_logprobs(&logits, &labels)?;
        Ok(MicroBatch { loss_sum: lp.f_sum(Kind::Float)?.f_neg()?, tokens, metrics: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn seq(ids: &[i64]) -> LabeledTokens {
        LabeledTokens { input_ids: ids.to_vec(), labels: ids.to_vec() }
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
                tch::no_grad(|| summed_nll(&m.lm, &ids, &labels)).unwrap().double_value(&[])
            })
            .sum();
        let rows = pack_sequences(&[a, b], 16);
        assert_eq!(rows.len(), 1);
        let mut obj = PackedObjective { lm: &m.lm, train: rows, validation: Vec::new(), pad_id: 0 };
        let packed = tch::no_grad(|| obj.forward(Split::Train, &[0])).unwrap().loss_sum.double_value(&[]);
        // other kernels (one long masked row vs two short ones): equal to f32 rounding of the
        // summed log-probs, ~1e-7 relative
        assert!((alone - packed).abs() <= 1e-5 * alone.abs(), "alone {alone} vs packed {packed}");
        assert_eq!(obj.units(Split::Train, 0), 4.0 + 3.0);
    }
}
