//! What each stage kind does when it runs: the training stages through one registry
//! (`train_stage`, shared with `align train`), the tokenizer and init stages, the evaluations,
//! and merged models for stages that need a full model.
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use align_core::data::{expand_data_paths, read_preference, read_sft, read_text_records};
use align_core::load::spec::{AdapterMode, ModelSpec};
use align_core::train::config::{sha256_hex, LoadedConfig};
use align_runs::{StageKind, TrainSummary};

use crate::lineage::*;
use crate::runner::*;
use crate::spec::*;

/// Runs one training stage of `kind` (the registry `align train KIND` uses too).
pub fn train_stage(
    kind: StageKind,
    cfg: &LoadedConfig,
    restart: bool,
    stop_after: Option<u64>,
) -> Result<TrainSummary> {
    match kind {
        StageKind::Pretrain => align_pretrain::run(cfg, restart, stop_after),
        StageKind::Sft => align_sft::run(cfg, restart, stop_after),
        StageKind::Reward => align_reward::run(cfg, restart, stop_after),
        StageKind::Dpo => align_rlhf::run_dpo(cfg, restart, stop_after),
        StageKind::Ppo => align_rlhf::run_ppo(cfg, restart, stop_after),
        StageKind::Grpo | StageKind::Rloo | StageKind::ReinforcePp => align_rlhf::run_grpo(cfg, restart, stop_after),
        StageKind::Kto => align_rlhf::run_kto(cfg, restart, stop_after),
        StageKind::Distill => align_rlhf::run_distill(cfg, restart, stop_after),
        StageKind::Tokenizer | StageKind::Init | StageKind::Eval => {
            bail!("{kind} is not a training stage (expected one of {})", StageKind::list(&StageKind::training_kinds()))
        }
    }
}

pub(crate) fn run_stage(
    p: &Pipeline,
    s: &StageSpec,
    plan: &StagePlan,
    restart: bool,
) -> Result<(Option<TrainSummary>, Option<Value>)> {
    match (s.kind, plan.cfg.as_ref(), plan.input.as_ref()) {
        (StageKind::Tokenizer, _, _) => Ok((None, Some(run_tokenizer_stage(p, s)?))),
        (StageKind::Init, _, _) => Ok((None, Some(run_init_stage(p, s, plan)?))),
        (StageKind::Eval, _, Some(input)) => Ok((None, Some(run_eval(s, input)?))),
        (kind, Some(c), _) if kind.trains() => Ok((Some(train_stage(kind, c, restart, None)?), None)),
        (kind, _, _) => bail!("stage '{}' ({kind}): no config or input model to run it with", s.name),
    }
}

/// Trains the stage's tokenizer into `<stage>/final` with align-core's BPE training (the same as
/// `align tokenizer train`).
pub(crate) fn run_tokenizer_stage(p: &Pipeline, s: &StageSpec) -> Result<Value> {
    use align_core::text::tokenizer_train::{train_bpe_tokenizer, BpeTraining};
    let int = |key: &str| s.table.get(key).and_then(|v| v.as_integer());
    let files: Vec<String> = s
        .table
        .get("data")
        .and_then(|d| d.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let spec = BpeTraining {
        vocab_size: int("vocab_size").ok_or_else(|| anyhow!("stage '{}': vocab_size missing", s.name))?.max(0) as usize,
        min_frequency: int("min_frequency").unwrap_or(2).max(1) as u64,
        files: expand_data_paths(&files)?,
    };
    let out = p.stage_dir(s).join("final");
    let mut trained = None;
    align_core::hf::folder::write_folder(&out, |tmp| {
        trained = Some(train_bpe_tokenizer(&spec, tmp)?);
        Ok(())
    })?;
    let trained = trained.ok_or_else(|| anyhow!("stage '{}': the tokenizer was not trained", s.name))?;
    tracing::info!(
        "stage {}: trained a {}-token byte-level BPE on {} texts → {}",
        s.name,
        trained.vocab_size,
        trained.texts,
        out.display()
    );
    Ok(json!({"vocab_size": trained.vocab_size, "texts": trained.texts}))
}

/// Random-initialises the stage's model into `<stage>/final` with align-core's `init_model` (the
/// same as `align init`; the seed is the description's).
pub(crate) fn run_init_stage(p: &Pipeline, s: &StageSpec, plan: &StagePlan) -> Result<Value> {
    let desc = s.description.as_ref().ok_or_else(|| anyhow!("stage '{}': no model description", s.name))?;
    let tok = plan.tokenizer_dir.as_ref().ok_or_else(|| anyhow!("stage '{}': no tokenizer", s.name))?;
    let out = p.stage_dir(s).join("final");
    let mut made = None;
    align_core::hf::folder::write_folder(&out, |tmp| {
        made = Some(align_core::model::init::init_model(desc, tok, tmp, None)?);
        Ok(())
    })?;
    let config = made.ok_or_else(|| anyhow!("stage '{}': the model was not initialised", s.name))?;
    tracing::info!(
        "stage {}: initialised a {} model with {} parameters → {}",
        s.name,
        config.model_type.as_str(),
        config.num_parameters(),
        out.display()
    );
    Ok(
        json!({"parameters": config.num_parameters(), "vocab_size": config.vocab_size, "model_type": config.model_type.as_str()}),
    )
}

pub(crate) fn run_eval(s: &StageSpec, input: &Produced) -> Result<Value> {
    use align_core::infer::logprobs::corpus_perplexity;
    let settings = s.eval_settings.as_ref().ok_or_else(|| anyhow!("stage '{}': not an eval stage", s.name))?;
    let device = align_core::model::device::parse_device(settings.train.device.as_deref().unwrap_or("auto"))?;
    let kind = align_core::model::device::parse_dtype(settings.train.dtype.as_deref(), device)?;
    if let Some(n) = settings.train.threads {
        tch::set_num_threads(n);
    }
    if s.eval.as_deref() == Some("reward") {
        return run_reward_eval(s, settings, input, device, kind);
    }
    let spec = ModelSpec::at(&input.model, input.adapter.as_deref(), device, kind);
    let loaded = spec.causal_lm(AdapterMode::Attach)?;
    let (m, tok) = (&loaded.model, &loaded.tokenizer);
    let files = &settings.data;
    if s.eval.as_deref() == Some("choice") {
        return run_choice_eval(s, settings, input, &m.lm, tok);
    }
    if s.eval.as_deref() == Some("answers") {
        let conversations = read_sft(files, &settings.data_options)?.records;
        let cases = conversations.iter().map(align_core::eval::answers::answer_case).collect::<Result<Vec<_>>>()?;
        let r = tch::no_grad(|| {
            align_core::eval::answers::evaluate_answers(
                &m.lm,
                tok,
                &cases,
                settings.max_new_tokens,
                settings.train.batch_size(),
            )
        })?;
        let sc = r.scores;
        tracing::info!(
            "stage {}: BLEU-4 {:.4}, ROUGE-L {:.4}, char F1 {:.4}, exact match {:.4}, F1 {:.4} over {} answers",
            s.name,
            sc.bleu4,
            sc.rouge_l,
            sc.char_f1,
            sc.exact_match,
            sc.f1,
            sc.samples
        );
        let examples: Vec<Value> = r
            .answered
            .iter()
            .take(5)
            .map(|a| json!({"prompt": a.prompt, "reference": a.reference, "answer": a.answer}))
            .collect();
        return Ok(
            json!({"eval": "answers", "model": input.model.display().to_string(), "bleu4": sc.bleu4, "rouge_l": sc.rouge_l, "char_f1": sc.char_f1, "exact_match": sc.exact_match, "f1": sc.f1, "samples": sc.samples, "examples": examples}),
        );
    }
    let mut texts = Vec::new();
    for f in expand_data_paths(files)? {
        texts.extend(read_text_records(&f)?.into_iter().map(|r| r.text));
    }
    let r = tch::no_grad(|| corpus_perplexity(&m.lm, tok, &texts, settings.train.max_length(), 8192))?;
    tracing::info!("stage {}: perplexity {:.3} over {} tokens", s.name, r.perplexity, r.tokens);
    Ok(
        json!({"eval": "perplexity", "model": input.model.display().to_string(), "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "records": r.records}),
    )
}

/// A multiple-choice benchmark as `align eval choice` scores it (per subject and overall).
fn run_choice_eval(
    s: &StageSpec,
    settings: &EvalSettings,
    input: &Produced,
    lm: &align_core::model::decoder::CausalLm,
    tok: &align_core::ModelTokenizer,
) -> Result<Value> {
    use align_core::eval::choice::{evaluate_choice, read_choice_files, ChoiceOptions};
    let c = settings.choice.as_ref().ok_or_else(|| anyhow!("stage '{}': no [choice] section", s.name))?;
    let items = read_choice_files(&expand_data_paths(&settings.data)?)?;
    let dev = if c.dev.is_empty() { Vec::new() } else { read_choice_files(&expand_data_paths(&c.dev)?)? };
    let opts = ChoiceOptions {
        template: c.template.parse()?,
        shots: c.shots,
        chat: c.chat,
        scoring: c.scoring.parse()?,
        batch: settings.train.batch_size(),
        max_length: settings.train.max_length,
        max_new_tokens: settings.max_new_tokens,
    };
    let r = tch::no_grad(|| evaluate_choice(lm, tok, &items, &dev, &opts))?;
    let mean = |m: &Option<align_core::eval::choice::MeanStderr>| m.map(|m| m.mean);
    let stderr = |m: &Option<align_core::eval::choice::MeanStderr>| m.and_then(|m| m.stderr);
    tracing::info!(
        "stage {}: {} items, acc {}, exact_match {}",
        s.name,
        r.overall.items,
        mean(&r.overall.acc).map_or("-".into(), |a| format!("{a:.4}")),
        mean(&r.overall.exact_match).map_or("-".into(), |a| format!("{a:.4}"))
    );
    let subjects: serde_json::Map<String, Value> = r
        .subjects
        .iter()
        .map(|x| (x.subject.clone(), json!({"items": x.items, "acc": mean(&x.acc), "acc_norm": mean(&x.acc_norm), "exact_match": mean(&x.exact_match)})))
        .collect();
    Ok(json!({
        "eval": "choice",
        "model": input.model.display().to_string(),
        "template": r.template,
        "shots": r.shots,
        "chat": r.chat,
        "items": r.overall.items,
        "acc": mean(&r.overall.acc),
        "acc_stderr": stderr(&r.overall.acc),
        "acc_norm": mean(&r.overall.acc_norm),
        "exact_match": mean(&r.overall.exact_match),
        "truncated": r.truncated,
        "by_subject": subjects,
    }))
}

/// Pairwise accuracy of a reward model on preference pairs, overall and on length-matched pairs
/// (answers within 10% in tokens), as `align eval reward` reports it.
pub(crate) fn run_reward_eval(
    s: &StageSpec,
    settings: &EvalSettings,
    input: &Produced,
    device: tch::Device,
    kind: tch::Kind,
) -> Result<Value> {
    use align_core::data::{LengthBudget, LengthPolicy};
    let (rm, tok) = ModelSpec::at(&input.model, input.adapter.as_deref(), device, kind).scalar_model()?;
    let pairs = read_preference(&settings.data, &settings.data_options)?.records;
    let budget = LengthBudget::new(settings.train.max_length(), LengthPolicy::Truncate);
    let (encoded, counts) =
        align_core::train::preference_batch::encode_pairs(&tok, &pairs.iter().collect::<Vec<_>>(), budget)?;
    if encoded.is_empty() {
        bail!("stage '{}': no pair is left after truncation to train.max_length", s.name);
    }
    let st = align_reward::pairwise_stats(&rm.rm, &encoded, settings.train.batch_size())?;
    tracing::info!(
        "stage {}: reward accuracy {:.4} over {} pairs; length-matched {} pairs, accuracy {}; chosen longer in {:.1}%",
        s.name,
        st.accuracy,
        st.pairs,
        st.length_matched_pairs,
        st.length_matched_accuracy.map_or("-".to_string(), |a| format!("{a:.4}")),
        st.longer_chosen_share * 100.0
    );
    Ok(json!({
        "eval": "reward",
        "model": input.model.display().to_string(),
        "accuracy": st.accuracy,
        "length_matched_accuracy": st.length_matched_accuracy,
        "length_matched_pairs": st.length_matched_pairs,
        "pairs": st.pairs,
        "longer_chosen_share": st.longer_chosen_share,
        "mean_margin": st.mean_margin,
        "truncated": counts.truncated,
        "length_match_tolerance": align_reward::LENGTH_MATCH_TOLERANCE,
    }))
}

/// A plain model folder for base + adapter: the adapter merged into the weights (a reward-model
/// adapter gives a `*ForSequenceClassification` folder), written once to
/// `<adapter folder>/../merged` and reused while the adapter's content hash is the same.
pub(crate) fn merged(input: &Produced) -> Result<Produced> {
    let Some(adapter) = &input.adapter else { return Ok(input.clone()) };
    let dir = adapter.parent().unwrap_or(adapter).join("merged");
    let marker = dir.join(".merged_from");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(input.hash.as_str()) {
        tracing::info!("merging {} into {} → {}", adapter.display(), input.model.display(), dir.display());
        // the one merge path of `align export`: merged in f32, probe-checked, stored in the base's dtype
        align_core::load::merge::merge_adapter(
            &input.model,
            adapter,
            &dir,
            &align_core::load::merge::MergeOptions::default(),
        )?;
        align_core::hf::folder::write_file_atomic(&marker, input.hash.as_bytes())?;
    }
    Ok(Produced { model: dir, adapter: None, hash: input.hash.clone() })
}

/// Creates (or reuses) RUN_DIR/init from `defaults.init` and `defaults.tokenizer` with `align init`'s code.
pub(crate) fn init_model(p: &Pipeline, desc: &Path, tokenizer: &Path) -> Result<Produced> {
    let dir = p.run_dir.join("init");
    let key = sha256_hex(format!("{}|{}", content_hash(desc)?, content_hash(tokenizer)?).as_bytes());
    let marker = dir.join(".init_key");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(key.as_str()) {
        tracing::info!("initialising the starting model from {} → {}", desc.display(), dir.display());
        align_core::model::init::init_model(desc, tokenizer, &dir, None)?;
        std::fs::write(&marker, &key)?;
    }
    let hash = sha256_hex(format!("init:{key}").as_bytes());
    Ok(Produced { model: dir, adapter: None, hash })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    #[test]
    fn a_reward_adapter_is_merged_into_a_reward_model_folder() {
        let tmp = tempfile::tempdir().unwrap();
        // a LoRA reward stage's output: base model + adapter in <stage>/final
        let adapter = tmp.path().join("rm/final");
        std::fs::create_dir_all(&adapter).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixtures().join("peft/llama-seqcls").join(f), adapter.join(f)).unwrap();
        }
        let input = Produced {
            model: fixtures().join("models/tiny-llama"),
            adapter: Some(adapter.clone()),
            hash: "h1".to_string(),
        };
        let out = merged(&input).unwrap();
        assert_eq!((out.model.clone(), out.adapter.clone()), (tmp.path().join("rm/merged"), None));
        let rm = align_core::model::scalar::load_reward_model(&out.model, tch::Device::Cpu, tch::Kind::Float).unwrap();
        let golden = tch::Tensor::read_safetensors(fixtures().join("peft/llama-seqcls/golden.safetensors")).unwrap();
        let get = |n: &str| golden.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let got = tch::no_grad(|| rm.rm.forward(&get("input_ids"))).unwrap();
        let diff = (got - get("scores")).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "merged reward model scores differ from PEFT's by {diff}");
    }
}
