//! Multiple-choice benchmarks (C-Eval, CMMLU, MMLU, MedQA-style) scored as lm-evaluation-harness
//! scores them: each option's letter is a continuation of the item's prompt, its log-likelihood
//! decides (`acc`; `acc_norm` divides by the option string's length, as lm-eval does), and
//! optionally the model answers greedily and the first option letter of its answer is compared
//! (`exact_match`). Items run in batches; an item's prompt goes through the model once, its
//! options continue from the KV cache. Per-subject and overall means with lm-eval's standard errors.
pub mod items;
pub mod prompt;

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::eval::answers::stop_token_ids;
use crate::infer::generate::{generate, SamplingConfig};
use crate::model::decoder::{CausalLm, ForwardOptions, KvCache};
use crate::text::tokenizer::ModelTokenizer;
pub use items::{choice_label, read_choice_file, ChoiceItem};
pub use prompt::{encode_options, render_prompt, ChoicePrompt, ChoiceTemplate};

pub use crate::eval::stats::MeanStderr;
use crate::eval::stats::{mean_stderr, pooled};

/// The token ids of one item: its context and the continuation of each option.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceRequest {
    pub context: Vec<i64>,
    pub continuations: Vec<Vec<i64>>,
}

/// The log-likelihood of one continuation and whether greedy decoding would produce it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ContinuationScore {
    pub loglikelihood: f64,
    pub is_greedy: bool,
}

/// The context tokens a request is scored with: all of them, or the last ones when the context
/// and its longest continuation do not fit `max_length` + 1 positions (lm-eval cuts
/// `(context + continuation)[-(max_length + 1):]` from the left too).
pub fn kept_context(request: &ChoiceRequest, max_length: usize) -> &[i64] {
    let longest = request.continuations.iter().map(Vec::len).max().unwrap_or(1);
    let keep = (max_length + 1).saturating_sub(longest).max(1);
    &request.context[request.context.len().saturating_sub(keep)..]
}

/// The log-likelihoods of every request's continuations, `batch` requests per forward pass.
/// Contexts are left-padded into one batch and run once with a KV cache; the option rows then
/// continue from their item's cached context. Contexts are cut as [`kept_context`] says.
pub fn choice_loglikelihoods(
    lm: &CausalLm,
    requests: &[ChoiceRequest],
    batch: usize,
    max_length: usize,
    pad_id: i64,
) -> Result<Vec<Vec<ContinuationScore>>> {
    let _guard = tch::no_grad_guard();
    let device = lm.device();
    let mut out = vec![Vec::new(); requests.len()];
    // longest first: batches of similar lengths waste less on padding
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].context.len()));
    for chunk in order.chunks(batch.max(1)) {
        let reqs: Vec<&ChoiceRequest> = chunk.iter().map(|&i| &requests[i]).collect();
        let contexts: Vec<&[i64]> = reqs.iter().map(|r| kept_context(r, max_length)).collect();
        let b = reqs.len();
        let w0 = contexts.iter().map(|c| c.len()).max().unwrap_or(1).max(1);
        let wc = reqs.iter().flat_map(|r| r.continuations.iter().map(|c| c.len().saturating_sub(1))).max().unwrap_or(0);
        let mut ids = vec![pad_id; b * w0];
        let mut mask = vec![0i64; b * w0];
        for (r, c) in contexts.iter().enumerate() {
            let start = r * w0 + w0 - c.len();
            ids[start..start + c.len()].copy_from_slice(c);
            mask[start..start + c.len()].fill(1);
        }
        let shape = [b as i64, w0 as i64];
        let ids_t = Tensor::from_slice(&ids).f_view(shape)?.f_to_device(device)?;
        let mask_t = Tensor::from_slice(&mask).f_view(shape)?.f_to_device(device)?;
        let mut cache = KvCache::new(&lm.config, b as i64, (w0 + wc) as i64, lm.kind(), device)?;
        let opts = ForwardOptions { attention_mask: Some(&mask_t), ..Default::default() };
        let hidden = lm.model.forward(&ids_t, &opts, Some(&mut cache))?;
        let last = hidden.f_narrow(1, w0 as i64 - 1, 1)?.f_squeeze_dim(1)?;
        let lp = lm.lm_logits(&last)?.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?;
        let best: Vec<i64> = Vec::try_from(lp.f_argmax(-1, false)?.f_to_device(Device::Cpu)?)?;
        // the first token of every option, read from its item's last position
        let (mut rows, mut first) = (Vec::new(), Vec::new());
        for (r, req) in reqs.iter().enumerate() {
            for c in &req.continuations {
                if c.is_empty() {
                    bail!("an option's continuation has no token");
                }
                rows.push(r as i64);
                first.push(c[0]);
            }
        }
        let rows_t = Tensor::from_slice(&rows).f_to_device(device)?;
        let first_t = Tensor::from_slice(&first).f_to_device(device)?.f_unsqueeze(1)?;
        let first_lp: Vec<f64> = Vec::try_from(
            lp.f_index_select(0, &rows_t)?
                .f_gather(1, &first_t, false)?
                .f_squeeze_dim(1)?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?,
        )?;
        let mut scores: Vec<ContinuationScore> = first
            .iter()
            .zip(&rows)
            .zip(&first_lp)
            .map(|((&tok, &r), &l)| ContinuationScore { loglikelihood: l, is_greedy: best[r as usize] == tok })
            .collect();
        if wc > 0 {
            // the options' remaining tokens continue from a copy of their item's cache row
            let conts: Vec<&Vec<i64>> = reqs.iter().flat_map(|r| r.continuations.iter()).collect();
            let n = conts.len();
            cache.select_rows(&rows_t)?;
            let mut input = vec![pad_id; n * wc];
            let mut target = vec![0i64; n * wc];
            let mut cmask = vec![0i64; n * (w0 + wc)];
            for (k, c) in conts.iter().enumerate() {
                let r = rows[k] as usize;
                cmask[k * (w0 + wc)..k * (w0 + wc) + w0].copy_from_slice(&mask[r * w0..(r + 1) * w0]);
                for j in 0..c.len() - 1 {
                    input[k * wc + j] = c[j];
                    target[k * wc + j] = c[j + 1];
                    cmask[k * (w0 + wc) + w0 + j] = 1;
                }
            }
            let input_t = Tensor::from_slice(&input).f_view([n as i64, wc as i64])?.f_to_device(device)?;
            let cmask_t = Tensor::from_slice(&cmask).f_view([n as i64, (w0 + wc) as i64])?.f_to_device(device)?;
            let target_t = Tensor::from_slice(&target).f_view([n as i64, wc as i64])?.f_to_device(device)?;
            let opts = ForwardOptions { attention_mask: Some(&cmask_t), ..Default::default() };
            let hidden = lm.model.forward(&input_t, &opts, Some(&mut cache))?;
            let lp = lm.lm_logits(&hidden)?.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?;
            let greedy = lp.f_argmax(-1, false)?.f_eq_tensor(&target_t)?;
            let tok_lp = lp.f_gather(2, &target_t.f_unsqueeze(2)?, false)?.f_squeeze_dim(2)?;
            let tok_lp: Vec<f64> =
                Vec::try_from(tok_lp.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?.f_view([-1])?)?;
            let greedy: Vec<bool> = Vec::try_from(greedy.f_to_device(Device::Cpu)?.f_view([-1])?)?;
            for (k, c) in conts.iter().enumerate() {
                for j in 0..c.len() - 1 {
                    scores[k].loglikelihood += tok_lp[k * wc + j];
                    scores[k].is_greedy &= greedy[k * wc + j];
                }
            }
        }
        let mut it = scores.into_iter();
        for (&i, req) in chunk.iter().zip(&reqs) {
            out[i] = it.by_ref().take(req.continuations.len()).collect();
        }
    }
    Ok(out)
}

/// How items are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceScoring {
    /// Log-likelihood of each option (`acc`, `acc_norm`).
    Loglikelihood,
    /// A greedy answer, its first option letter (`exact_match`).
    Generate,
    /// Both.
    Both,
}

impl std::str::FromStr for ChoiceScoring {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "loglikelihood" => ChoiceScoring::Loglikelihood,
            "generate" => ChoiceScoring::Generate,
            "both" => ChoiceScoring::Both,
            other => bail!("scoring: expected loglikelihood, generate or both, found '{other}'"),
        })
    }
}

impl ChoiceScoring {
    fn loglikelihood(self) -> bool {
        self != ChoiceScoring::Generate
    }
    fn generate(self) -> bool {
        self != ChoiceScoring::Loglikelihood
    }
}

/// Settings of one multiple-choice evaluation.
#[derive(Debug, Clone)]
pub struct ChoiceOptions {
    pub template: ChoiceTemplate,
    /// Solved examples before each item: the first `shots` dev items of its subject.
    pub shots: usize,
    /// Render through the model's chat template.
    pub chat: bool,
    pub scoring: ChoiceScoring,
    /// Items per forward pass.
    pub batch: usize,
    /// Longest sequence a forward pass sees (contexts keep their last tokens); None: the model's
    /// `max_position_embeddings`, lm-eval's default.
    pub max_length: Option<usize>,
    /// Tokens a generated answer may have.
    pub max_new_tokens: usize,
}

/// One scored item.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceItemResult {
    pub origin: String,
    pub subject: String,
    /// The rendered context the options continue.
    pub prompt: String,
    pub answer: usize,
    /// Per option, in order (empty without log-likelihood scoring).
    pub loglikelihoods: Vec<f64>,
    pub is_greedy: Vec<bool>,
    pub prediction: Option<usize>,
    pub prediction_norm: Option<usize>,
    pub acc: Option<f64>,
    pub acc_norm: Option<f64>,
    pub generated: Option<String>,
    /// The option the generated answer names (None: none found).
    pub generated_choice: Option<usize>,
    pub exact_match: Option<f64>,
}

/// Scores of one subject (or of all items).
#[derive(Debug, Clone, Serialize)]
pub struct SubjectScores {
    pub subject: String,
    pub items: usize,
    pub acc: Option<MeanStderr>,
    pub acc_norm: Option<MeanStderr>,
    pub exact_match: Option<MeanStderr>,
}

/// What `align eval choice` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceReport {
    pub template: &'static str,
    pub shots: usize,
    pub chat: bool,
    pub subjects: Vec<SubjectScores>,
    /// All items: the size-weighted mean of the subjects, with lm-eval's pooled standard error.
    pub overall: SubjectScores,
    /// Items whose context was cut to `max_length`.
    pub truncated: usize,
    pub items: Vec<ChoiceItemResult>,
}

/// Index of the first largest value (numpy's `argmax`).
fn argmax(values: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, v) in values.iter().enumerate() {
        if best.is_none_or(|b| *v > values[b]) {
            best = Some(i);
        }
    }
    best
}

/// The option a generated answer names: its first character when that is an option letter
/// (after whitespace and an opening bracket), else the letter after "answer is" / "答案是" /
/// "答案：" / "Answer:". None when neither is found.
pub fn answer_letter(answer: &str, options: usize) -> Option<usize> {
    let is_option = |c: char| c.is_ascii_uppercase() && ((c as u8 - b'A') as usize) < options;
    let head = answer.trim_start().trim_start_matches(['(', '（', '[', '【']);
    let mut chars = head.chars();
    if let Some(c) = chars.next() {
        let next = chars.next();
        if is_option(c) && next.is_none_or(|n| ".)）:：、,，\n".contains(n)) {
            return Some((c as u8 - b'A') as usize);
        }
    }
    let lower = answer.to_lowercase();
    for cue in ["answer is", "answer:", "答案是", "答案：", "答案:", "答案为", "选项"] {
        if let Some(p) = lower.find(cue) {
            // the cues are ASCII or CJK, whose lowercase keeps the byte offsets
            let rest = answer.get(p + cue.len()..).unwrap_or("");
            let rest = rest.trim_start().trim_start_matches(['(', '（', '[', '【', ':', '：']).trim_start();
            if let Some(c) = rest.chars().next() {
                if is_option(c) {
                    return Some((c as u8 - b'A') as usize);
                }
            }
        }
    }
    None
}

/// The solved examples of each subject: the dev items of that subject, in file order.
pub fn shots_by_subject(dev: &[ChoiceItem]) -> BTreeMap<&str, Vec<&ChoiceItem>> {
    let mut by: BTreeMap<&str, Vec<&ChoiceItem>> = BTreeMap::new();
    for d in dev {
        by.entry(d.subject.as_str()).or_default().push(d);
    }
    by
}

/// Renders every item's prompt with its subject's first `shots` dev items.
pub fn render_prompts(
    items: &[ChoiceItem],
    dev: &[ChoiceItem],
    opts: &ChoiceOptions,
    tok: &ModelTokenizer,
) -> Result<Vec<ChoicePrompt>> {
    let by_subject = shots_by_subject(dev);
    let mut prompts = Vec::with_capacity(items.len());
    for item in items {
        let shots: &[&ChoiceItem] = if opts.shots == 0 {
            &[]
        } else {
            let have = by_subject.get(item.subject.as_str()).map_or(&[][..], Vec::as_slice);
            if have.len() < opts.shots {
                bail!(
                    "{}: {} solved examples of subject '{}' requested, the dev data has {} (dev items count for the subject of their `subject` field or file name)",
                    item.origin,
                    opts.shots,
                    item.subject,
                    have.len()
                );
            }
            &have[..opts.shots]
        };
        prompts.push(render_prompt(opts.template, item, shots, opts.chat.then_some(tok))?);
    }
    Ok(prompts)
}

/// Scores the items with `lm`.
pub fn evaluate_choice(
    lm: &CausalLm,
    tok: &ModelTokenizer,
    items: &[ChoiceItem],
    dev: &[ChoiceItem],
    opts: &ChoiceOptions,
) -> Result<ChoiceReport> {
    if items.is_empty() {
        bail!("no multiple-choice items to evaluate");
    }
    let prompts = render_prompts(items, dev, opts, tok)?;
    let mut results: Vec<ChoiceItemResult> = items
        .iter()
        .zip(&prompts)
        .map(|(it, p)| ChoiceItemResult {
            origin: it.origin.to_string(),
            subject: it.subject.clone(),
            prompt: p.context.clone(),
            answer: it.answer,
            loglikelihoods: Vec::new(),
            is_greedy: Vec::new(),
            prediction: None,
            prediction_norm: None,
            acc: None,
            acc_norm: None,
            generated: None,
            generated_choice: None,
            exact_match: None,
        })
        .collect();
    let mut truncated = 0;
    let pad = tok.padding_id();
    let max_length = opts.max_length.unwrap_or(lm.config.max_position_embeddings as usize);
    if opts.scoring.loglikelihood() {
        let mut requests = Vec::with_capacity(items.len());
        for (item, p) in items.iter().zip(&prompts) {
            let (context, continuations) = encode_options(tok, &p.context, &p.continuations(item))
                .map_err(|e| anyhow::anyhow!("{}: {e}", item.origin))?;
            requests.push(ChoiceRequest { context, continuations });
        }
        truncated = requests.iter().filter(|r| kept_context(r, max_length).len() < r.context.len()).count();
        if truncated > 0 {
            tracing::warn!("{truncated} items were cut from the left to {max_length} tokens");
        }
        let scores = choice_loglikelihoods(lm, &requests, opts.batch, max_length, pad)?;
        for ((r, item), s) in results.iter_mut().zip(items).zip(scores) {
            let lls: Vec<f64> = s.iter().map(|c| c.loglikelihood).collect();
            // acc_norm divides by the option string's length in characters (lm-eval's completion_len)
            let lens: Vec<f64> = (0..item.choices.len()).map(|i| choice_label(i).chars().count() as f64).collect();
            let normed: Vec<f64> = lls.iter().zip(&lens).map(|(l, n)| l / n).collect();
            r.prediction = argmax(&lls);
            r.prediction_norm = argmax(&normed);
            r.acc = Some(f64::from(u8::from(r.prediction == Some(item.answer))));
            r.acc_norm = Some(f64::from(u8::from(r.prediction_norm == Some(item.answer))));
            r.is_greedy = s.iter().map(|c| c.is_greedy).collect();
            r.loglikelihoods = lls;
        }
    }
    if opts.scoring.generate() {
        let stops = stop_token_ids(tok, &lm.config.eos_token_ids);
        let mut encoded = Vec::with_capacity(items.len());
        for p in &prompts {
            let mut ids = prompt::lm_eval_encode(tok, &p.context)?;
            let keep = max_length.saturating_sub(opts.max_new_tokens).max(1);
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
            encoded.push(ids);
        }
        let cfg = SamplingConfig { max_new_tokens: opts.max_new_tokens, ..Default::default() };
        let mut start = 0;
        for chunk in encoded.chunks(opts.batch.max(1)) {
            let gens = tch::no_grad(|| generate(lm, chunk, &cfg, &stops, pad))?;
            for (k, g) in gens.into_iter().enumerate() {
                let (r, item) = (&mut results[start + k], &items[start + k]);
                let text = tok.decode(&g.tokens, true)?;
                r.generated_choice = answer_letter(&text, item.choices.len());
                r.exact_match = Some(f64::from(u8::from(r.generated_choice == Some(item.answer))));
                r.generated = Some(text);
            }
            start += chunk.len();
        }
    }
    let mut subjects: BTreeMap<&str, Vec<&ChoiceItemResult>> = BTreeMap::new();
    for r in &results {
        subjects.entry(r.subject.as_str()).or_default().push(r);
    }
    let metric = |rs: &[&ChoiceItemResult], f: fn(&ChoiceItemResult) -> Option<f64>| {
        mean_stderr(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    let subject_scores: Vec<SubjectScores> = subjects
        .iter()
        .map(|(s, rs)| SubjectScores {
            subject: s.to_string(),
            items: rs.len(),
            acc: metric(rs, |r| r.acc),
            acc_norm: metric(rs, |r| r.acc_norm),
            exact_match: metric(rs, |r| r.exact_match),
        })
        .collect();
    let overall_of = |f: fn(&SubjectScores) -> Option<MeanStderr>| {
        let parts: Vec<(MeanStderr, usize)> =
            subject_scores.iter().filter_map(|s| f(s).map(|m| (m, s.items))).collect();
        if parts.len() == 1 {
            Some(parts[0].0)
        } else {
            pooled(&parts)
        }
    };
    let overall = SubjectScores {
        subject: "overall".into(),
        items: results.len(),
        acc: overall_of(|s| s.acc),
        acc_norm: overall_of(|s| s.acc_norm),
        exact_match: overall_of(|s| s.exact_match),
    };
    Ok(ChoiceReport {
        template: opts.template.as_str(),
        shots: opts.shots,
        chat: opts.chat,
        subjects: subject_scores,
        overall,
        truncated,
        items: results,
    })
}

/// Reads the items of several files (see [`items::read_choice_file`]).
pub fn read_choice_files(paths: &[std::path::PathBuf]) -> Result<Vec<ChoiceItem>> {
    let mut all = Vec::new();
    for p in paths {
        let items = read_choice_file(p)?;
        if items.is_empty() {
            bail!("{}: no items", p.display());
        }
        all.extend(items);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), Some(1));
    }

    #[test]
    fn finds_the_letter_an_answer_names() {
        assert_eq!(answer_letter(" B. because", 4), Some(1));
        assert_eq!(answer_letter("(C)", 4), Some(2));
        assert_eq!(answer_letter("A patient should …", 4), None);
        assert_eq!(answer_letter("The answer is D.", 4), Some(3));
        assert_eq!(answer_letter("答案是：B", 4), Some(1));
        assert_eq!(answer_letter("E", 4), None);
        assert_eq!(answer_letter("", 4), None);
    }
}
