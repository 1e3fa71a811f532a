//! Next-token loss over labelled token sequences: the objective of pretraining (every token
//! labelled) and SFT (assistant tokens labelled). Batches are right-padded, so causal attention
//! alone keeps padding out of every real position.
use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::conversation::LabeledTokens;
use crate::logprobs::{token_logprobs, IGNORE_INDEX};
use crate::model::{CausalLm, ForwardOptions};
use crate::trainer::{MicroBatch, Objective, Split};

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
