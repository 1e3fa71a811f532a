//! Knowledge distillation (GKD): a frozen teacher's next-token distributions over the completion
//! tokens of SFT conversations teach the student through a generalised JSD (forward KL … reverse
//! KL), mixed with SFT's cross-entropy; optionally on-policy: for a share `lmbda` of the
//! micro-batches the student writes the completions and the teacher scores them.
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use tch::{Kind, Tensor};

use align_core::data::{read_sft, Conversation, DataOptions, LengthBudget};
use align_core::eval::answers::stop_token_ids;
use align_core::hf::checkpoint::resolve_model_dir;
use align_core::hf::config::ModelConfig;
use align_core::infer::generate::{generate, SamplingConfig};
use align_core::infer::logprobs::{shifted_labels, IGNORE_INDEX};
use align_core::model::decoder::{CausalLm, ForwardOptions};
use align_core::model::quant::{QuantType4, Quantization};
use align_core::text::conversation::LabeledTokens;
use align_core::train::config::LoadedConfig;
use align_core::train::lm_objective::{chunked_head_loss, pad_batch, predicted_labels, SequenceSplits};
use align_core::train::preference_batch::read_splits;
use align_core::train::setup::{training_device, TrainingModel};
use align_core::train::trainer::{MicroBatch, Objective, Split, TrainSummary};

use crate::distill_loss::{generalized_jsd, validate_jsd};
use crate::reference::load_reference_model;

fn d_beta() -> f64 {
    0.5
}
fn d_temperature() -> f64 {
    0.9
}

/// `[distill]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher model folder (or cached hub id): frozen, same tokenizer as the student.
    pub teacher: String,
    /// Hold the teacher's projections in 4 bits: "nf4" or "fp4" (none: as `train.dtype`).
    #[serde(default)]
    pub teacher_quantize: Option<String>,
    /// β of the generalised JSD: 0 = forward KL(teacher ‖ student), 1 = reverse KL.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// Both models' logits are divided by it before the softmax (and on-policy sampling uses it).
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    /// Weight of SFT's cross-entropy on the completion tokens; the divergence gets 1 − alpha.
    #[serde(default)]
    pub alpha: f64,
    /// Share of the training micro-batches whose completions the student samples itself (GKD's λ).
    #[serde(default)]
    pub lmbda: f64,
    /// Tokens the student samples per completion on-policy (needed with lmbda > 0).
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Also train on system and user tokens (as `[sft] train_on_prompt`; off-policy batches).
    #[serde(default)]
    pub train_on_prompt: bool,
}

impl DistillSection {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        validate_jsd(self.beta, self.temperature)?;
        if !(0.0..=1.0).contains(&self.alpha) {
            bail!("'alpha': expected a number in [0, 1] (the weight of the cross-entropy), found {}", self.alpha);
        }
        if !(0.0..=1.0).contains(&self.lmbda) {
            bail!("'lmbda': expected a number in [0, 1] (the share of on-policy batches), found {}", self.lmbda);
        }
        match (self.lmbda > 0.0, self.max_new_tokens) {
            (true, None) => bail!(
                "'lmbda' = {}: on-policy batches need 'max_new_tokens' (how long the student's completions may be)",
                self.lmbda
            ),
            (true, Some(0)) => bail!("'max_new_tokens': expected at least 1, found 0"),
            (false, Some(_)) => {
                bail!("'max_new_tokens' is only used on-policy; set 'lmbda' > 0 (or remove 'max_new_tokens')")
            }
            _ => {}
        }
        if self.lmbda > 0.0 && self.train_on_prompt {
            bail!("'train_on_prompt': on-policy batches score only the student's completions; it cannot be combined with 'lmbda' > 0");
        }
        self.teacher_quantization().map(|_| ())
    }

    /// The teacher's quantisation, from `teacher_quantize`.
    pub fn teacher_quantization(&self) -> Result<Option<Quantization>> {
        let quant_type = match self.teacher_quantize.as_deref() {
            None => return Ok(None),
            Some("nf4") => QuantType4::Nf4,
            Some("fp4") => QuantType4::Fp4,
            Some(other) => bail!("'teacher_quantize': expected \"nf4\" or \"fp4\", found {other:?}"),
        };
        Ok(Some(Quantization::FourBit { quant_type, double_quant: false }))
    }
}

/// The prompt of an SFT sequence: its tokens before the final labelled run (the last assistant
/// answer).
pub fn prompt_of(seq: &LabeledTokens) -> &[i64] {
    let mut end = seq.labels.len();
    while end > 0 && seq.labels[end - 1] == IGNORE_INDEX {
        end -= 1;
    }
    let mut start = end;
    while start > 0 && seq.labels[start - 1] != IGNORE_INDEX {
        start -= 1;
    }
    &seq.input_ids[..start]
}

/// The distillation objective; one loss unit per completion token of the data. An on-policy
/// micro-batch's loss is its mean per sampled token, weighted like its examples' data tokens.
pub struct DistillObjective<'a> {
    pub student: &'a CausalLm,
    pub teacher: &'a CausalLm,
    pub data: SequenceSplits,
    pub pad_id: i64,
    pub beta: f64,
    pub temperature: f64,
    pub alpha: f64,
    pub lmbda: f64,
    /// Sampling of on-policy completions (None: off-policy only).
    pub sampling: Option<SamplingConfig>,
    pub stop_ids: Vec<i64>,
    /// `train.loss_chunk_tokens`: the LM heads in chunks of this many tokens (0 = at once).
    pub chunk_tokens: usize,
}

impl DistillObjective<'_> {
    fn split(&self, split: Split) -> &[LabeledTokens] {
        match split {
            Split::Train => &self.data.train,
            Split::Validation => &self.data.validation,
        }
    }

    /// The student's own completions of the sequences' prompts (a sequence whose sample is
    /// empty keeps its data completion).
    fn sample(&self, seqs: &[LabeledTokens], sampling: &SamplingConfig) -> Result<Vec<LabeledTokens>> {
        let prompts: Vec<Vec<i64>> = seqs.iter().map(|s| prompt_of(s).to_vec()).collect();
        self.student.set_training(false);
        let generations = tch::no_grad(|| generate(self.student, &prompts, sampling, &self.stop_ids, self.pad_id));
        self.student.set_training(true);
        Ok(generations?
            .into_iter()
            .zip(prompts)
            .zip(seqs)
            .map(|((g, prompt), seq)| {
                if g.tokens.is_empty() {
                    return seq.clone();
                }
                let mut labels = vec![IGNORE_INDEX; prompt.len()];
                labels.extend_from_slice(&g.tokens);
                let mut input_ids = prompt;
                input_ids.extend_from_slice(&g.tokens);
                LabeledTokens { input_ids, labels }
            })
            .collect())
    }
}

impl Objective for DistillObjective<'_> {
    fn len(&self, split: Split) -> usize {
        self.split(split).len()
    }

    fn units(&self, split: Split, example: usize) -> f64 {
        predicted_labels(&self.split(split)[example]) as f64
    }

    fn forward(&mut self, split: Split, examples: &[usize]) -> Result<MicroBatch> {
        let data: Vec<LabeledTokens> = examples.iter().map(|&e| self.split(split)[e].clone()).collect();
        let units: f64 = examples.iter().map(|&e| self.units(split, e)).sum();
        // the draw comes from the step's seeded random stream (off-policy runs draw nothing)
        let on_policy = match &self.sampling {
            Some(_) if split == Split::Train => {
                Tensor::f_rand([1], (Kind::Double, tch::Device::Cpu))?.f_double_value(&[0])? < self.lmbda
            }
            _ => false,
        };
        let seqs = match (&self.sampling, on_policy) {
            (Some(sampling), true) => self.sample(&data, sampling)?,
            _ => data,
        };
        let rows: Vec<&LabeledTokens> = seqs.iter().collect();
        let tokens = rows.iter().map(|s| s.input_ids.len()).sum();
        let device = self.student.device();
        let (ids, labels) = pad_batch(&rows, self.pad_id, device)?;
        // only the positions that predict a completion token go through the heads
        let shifted = shifted_labels(&labels)?.f_reshape([-1])?;
        let positions = shifted.f_ne(IGNORE_INDEX)?.f_nonzero()?.f_squeeze_dim(1)?;
        let scored = positions.size()[0];
        let select = |hidden: Tensor| -> Result<Tensor> {
            let h = *hidden.size().last().ok_or_else(|| anyhow!("hidden states without a shape"))?;
            Ok(hidden.f_reshape([-1, h])?.f_index_select(0, &positions)?.f_unsqueeze(0)?)
        };
        let student_hidden = select(self.student.model.forward(&ids, &ForwardOptions::default(), None)?)?;
        let teacher_hidden =
            tch::no_grad(|| select(self.teacher.model.forward(&ids, &ForwardOptions::default(), None)?))?;
        let targets = shifted.f_index_select(0, &positions)?;
        let (beta, temperature, alpha) = (self.beta, self.temperature, self.alpha);
        let (mut divergence, mut nll) = (0f64, 0f64);
        let teacher = self.teacher;
        let loss = chunked_head_loss(self.student, &student_hidden, self.chunk_tokens, |start, logits| {
            let len = logits.size()[1];
            let student_logits = logits.f_squeeze_dim(0)?;
            let teacher_logits =
                tch::no_grad(|| teacher.lm_logits(&teacher_hidden.f_narrow(1, start, len)?))?.f_squeeze_dim(0)?;
            let d = generalized_jsd(&student_logits, &teacher_logits, beta, temperature)?.f_sum(Kind::Float)?;
            let ce = student_logits.f_to_kind(Kind::Float)?.f_cross_entropy_loss::<Tensor>(
                &targets.f_narrow(0, start, len)?,
                None,
                tch::Reduction::Sum,
                IGNORE_INDEX,
                0.0,
            )?;
            divergence += d.f_double_value(&[])?;
            nll += ce.f_double_value(&[])?;
            Ok(d.f_mul_scalar(1.0 - alpha)?.f_add(&ce.f_mul_scalar(alpha)?)?)
        })?;
        // an on-policy batch counts as its data tokens: its mean per sampled token times those
        let scale = if on_policy { units / (scored.max(1) as f64) } else { 1.0 };
        let metrics = vec![
            ("divergence".to_string(), divergence * scale),
            ("nll".to_string(), nll * scale),
            ("on_policy".to_string(), f64::from(u8::from(on_policy))),
        ];
        let metric_counts = vec![("on_policy".to_string(), 1.0)];
        let loss_sum = if on_policy { loss.f_mul_scalar(scale)? } else { loss };
        Ok(MicroBatch { loss_sum, tokens, metrics, metric_counts })
    }
}

/// Runs (or resumes) the distillation stage described by `cfg`.
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let section: DistillSection = cfg.stage_section()?;
    let origin = cfg.origin.display();
    section.validate().map_err(|e| anyhow!("{origin}: [distill] {e}"))?;
    let options: DataOptions = cfg.data_options()?;
    let c = &cfg.config;
    let (device, kind) = training_device(cfg)?;
    let student_dir = resolve_model_dir(&c.model)?;
    let teacher_dir = resolve_model_dir(&section.teacher)?;
    let (student_vocab, teacher_vocab) =
        (ModelConfig::from_dir(&student_dir)?.vocab_size, ModelConfig::from_dir(&teacher_dir)?.vocab_size);
    if student_vocab != teacher_vocab {
        bail!(
            "{origin}: [distill] teacher: {} has vocab_size {teacher_vocab} but the student {} has {student_vocab}; the teacher must share the student's tokenizer",
            teacher_dir.display(),
            student_dir.display()
        );
    }
    tracing::info!("teacher: {} (frozen)", teacher_dir.display());
    let teacher = load_reference_model(&teacher_dir, None, device, kind, section.teacher_quantization()?)?;
    let tm = TrainingModel::load(cfg)?;
    tm.tokenizer.chat_template()?;
    let budget = LengthBudget::new(c.train.max_length, options.length_policy);
    let (train, val) = read_splits(cfg, &options, |paths, o| read_sft(paths, o))?;
    let encode = |convs: &[Conversation]| {
        align_sft::encode_all(&tm, &convs.iter().collect::<Vec<_>>(), section.train_on_prompt, budget)
    };
    let (train_seqs, tc) = encode(&train)?;
    let (val_seqs, vc) = encode(&val)?;
    if train_seqs.is_empty() {
        bail!(
            "{origin}: no training conversation is left after the length budget (train.max_length = {})",
            c.train.max_length
        );
    }
    tracing::info!(
        "distillation (beta {}, temperature {}, alpha {}, lmbda {}) on {} conversations ({} truncated, {} dropped at max_length {}), {} validation",
        section.beta,
        section.temperature,
        section.alpha,
        section.lmbda,
        tc.kept,
        tc.truncated,
        tc.dropped,
        c.train.max_length,
        vc.kept
    );
    let sampling = section.max_new_tokens.map(|max_new_tokens| SamplingConfig {
        max_new_tokens,
        temperature: section.temperature,
        top_k: None,
        top_p: None,
        repetition_penalty: None,
    });
    let mut objective = DistillObjective {
        student: &tm.loaded.lm,
        teacher: &teacher.lm,
        data: SequenceSplits { train: train_seqs, validation: val_seqs },
        pad_id: tm.tokenizer.padding_id(),
        beta: section.beta,
        temperature: section.temperature,
        alpha: section.alpha,
        lmbda: section.lmbda,
        sampling,
        stop_ids: stop_token_ids(&tm.tokenizer, &tm.loaded.lm.config.eos_token_ids),
        chunk_tokens: c.train.loss_chunk_tokens,
    };
    tm.train_on(cfg, &mut objective, restart, stop_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_ends_where_the_last_answer_starts() {
        let i = IGNORE_INDEX;
        let seq = LabeledTokens { input_ids: vec![1, 2, 3, 4, 5, 6, 7, 8], labels: vec![i, i, 3, i, i, 6, 7, i] };
        assert_eq!(prompt_of(&seq), &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn on_policy_keys_are_checked_together() {
        let s: DistillSection = toml::from_str("teacher = \"t\"").unwrap();
        s.validate().unwrap();
        let with = |t: &str| -> String {
            let s: DistillSection = toml::from_str(&format!("teacher = \"t\"\n{t}")).unwrap();
            s.validate().unwrap_err().to_string()
        };
        assert!(with("lmbda = 0.5").contains("'max_new_tokens'"));
        assert!(with("max_new_tokens = 8").contains("'lmbda'"));
        assert!(with("beta = 2.0").contains("'beta'"));
        assert!(with("alpha = -0.1").contains("'alpha'"));
        assert!(with("teacher_quantize = \"int8\"").contains("'teacher_quantize'"));
        let e = toml::from_str::<DistillSection>("teacher = \"t\"\nlambda = 0.5").unwrap_err().to_string();
        assert!(e.contains("lambda"), "{e}");
    }
}
