//! The runner: walks the stages in order, plans each one (its input model, config and hashes),
//! skips what is up to date, resumes what was interrupted, re-runs what changed and records it.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use align_core::hf::folder::{write_file_atomic, FolderLock};
use align_core::train::config::{canonical_json, set_path, sha256_hex, LoadedConfig};
use align_runs::files::{LOCK, PIPELINE_RECORD, STAGE_RECORD};
use align_runs::{StageKind, StageRecord, StageStatus};

use crate::lineage::*;
use crate::spec::*;
use crate::stages::*;

/// Which stages `align run` executes.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub from: Option<String>,
    pub only: Option<String>,
    pub restart: bool,
    pub command: String,
}

/// What each stage's run did.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutcome {
    Skipped,
    Ran,
    NotSelected,
}

/// The model (and adapter) a stage trains from and what it produced.
#[derive(Debug, Clone)]
pub(crate) struct Produced {
    pub(crate) model: PathBuf,
    pub(crate) adapter: Option<PathBuf>,
    pub(crate) hash: String,
}

/// Runs the pipeline; returns each stage's outcome in order.
pub fn run(p: &Pipeline, opts: &RunOptions) -> Result<Vec<(String, StageOutcome)>> {
    // under torchrun every rank walks the pipeline: rank 0 writes the run folder (records, the
    // lock), training stages run on all ranks, the other stages on rank 0 while the rest wait
    let world = align_core::dist::world();
    let main = world.is_main();
    // one runner per run folder: a second `align run` on it fails at once, naming the first one
    let _lock = if main { Some(FolderLock::acquire(&p.run_dir, LOCK)?) } else { None };
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    for sel in opts.from.iter().chain(opts.only.iter()) {
        if !names.contains(&sel.as_str()) {
            bail!("no stage named '{sel}' (stages: {})", names.join(", "));
        }
    }
    if main {
        write_file_atomic(
            &p.run_dir.join(PIPELINE_RECORD),
            (serde_json::to_string_pretty(
                &json!({"name": p.name, "stages": names, "file": p.file.display().to_string()}),
            )? + "\n")
                .as_bytes(),
        )?;
    }
    // the starting model: a given folder, one `align init` makes from a description, or none
    // (then every training stage starts from an earlier stage, e.g. an init stage)
    let base = match (&p.base_model, &p.init, &p.tokenizer) {
        (Some(m), _, _) => {
            let dir = align_core::hf::checkpoint::resolve_model_dir(m)?;
            Some(Produced { hash: content_hash(&dir)?, model: dir, adapter: None })
        }
        (None, Some(init), Some(TokenizerSource::Folder(tok))) => Some(main_first(|| init_model(p, init, tok))?),
        (None, Some(_), _) => bail!("defaults.init: needs defaults.tokenizer to be a tokenizer folder"),
        (None, None, _) => None,
    };
    // the tokenizer every trained model must share: defaults.tokenizer (known once its stage
    // ran), else the starting model's, else that of the first model a stage trains from
    let mut pipeline_tokenizer = match (&p.tokenizer, &base) {
        (Some(TokenizerSource::Folder(dir)), _) => Some(tokenizer_hash(dir)?),
        (Some(TokenizerSource::Stage(_)), _) => None,
        (None, Some(b)) => Some(tokenizer_hash(&b.model)?),
        (None, None) => None,
    };
    let mut produced: BTreeMap<String, Produced> = BTreeMap::new();
    let mut outcomes = Vec::new();
    let mut upstream_reran: Option<String> = None;
    let from_index = opts.from.as_ref().and_then(|f| names.iter().position(|n| n == f)).unwrap_or(0);
    for s in &p.stages {
        // every rank reads the records rank 0 wrote before this point
        world.barrier()?;
        let dir = p.stage_dir(s);
        let previous = read_record(&dir.join(STAGE_RECORD));
        let selected = s.index >= from_index && opts.only.as_ref().is_none_or(|o| o == &s.name);
        let plan = if s.makes_from_files() {
            if !selected {
                if let Some(prev) = previous.filter(|r| r.status == StageStatus::Done) {
                    if let Some(out) = stage_output(p, s, None, &prev) {
                        note_tokenizer(p, s, &out, &mut pipeline_tokenizer)?;
                        produced.insert(s.name.clone(), out);
                    }
                }
                outcomes.push((s.name.clone(), StageOutcome::NotSelected));
                continue;
            }
            plan_made_stage(p, s, &produced)?
        } else {
            let input = match &s.from {
                Some(f) => produced.get(f).cloned(),
                None => base.clone(),
            };
            if !selected {
                // an unselected stage still passes on what it produced earlier (if its input exists)
                if let (Some(prev), Some(input)) = (previous.filter(|r| r.status == StageStatus::Done), input) {
                    if let Some(out) = stage_output(p, s, Some(&trained_from(s, input)?), &prev) {
                        produced.insert(s.name.clone(), out);
                    }
                }
                outcomes.push((s.name.clone(), StageOutcome::NotSelected));
                continue;
            }
            let input = match (input, &s.from) {
                (Some(i), _) => i,
                (None, Some(f)) => {
                    bail!("stage '{}' needs '{f}', which has not produced a model (run it first)", s.name)
                }
                (None, None) => bail!("stage '{}': no starting model (set from = …)", s.name),
            };
            let tok_hash = tokenizer_hash(&input.model)?;
            let expected = pipeline_tokenizer.get_or_insert_with(|| tok_hash.clone());
            if tok_hash != *expected && !s.allow_tokenizer_mismatch {
                bail!(
                    "stage[{}] ({}): its input model {} has a different tokenizer or chat template than the pipeline's (set allow_tokenizer_mismatch = true to accept)",
                    s.index,
                    s.name,
                    input.model.display()
                );
            }
            plan_model_stage(p, s, trained_from(s, input)?, tok_hash, &produced)?
        };
        let input_hash = sha256_hex(canonical_json(&json!({"config": plan.config_hash, "inputs": plan.inputs, "data": plan.data, "tokenizer": plan.tokenizer_hash, "kind": s.kind, "eval": s.eval})).as_bytes());

        let done_with_same_inputs = !opts.restart
            && previous.as_ref().is_some_and(|r| r.status == StageStatus::Done && r.input_hash == input_hash);
        // a done stage whose output was deleted or changed since is run again (resuming: its
        // checkpoints, if kept, make that quick)
        let damaged =
            if done_with_same_inputs { previous.as_ref().and_then(|r| damaged_output(p, s, r)) } else { None };
        if done_with_same_inputs && damaged.is_none() {
            let prev = previous.clone().unwrap_or_else(|| StageRecord::new(&s.name, s.kind));
            if let Some(out) = stage_output(p, s, plan.input.as_ref(), &prev) {
                note_tokenizer(p, s, &out, &mut pipeline_tokenizer)?;
                produced.insert(s.name.clone(), out);
            }
            tracing::info!("stage {} ({}): up to date, skipped", s.name, s.kind);
            outcomes.push((s.name.clone(), StageOutcome::Skipped));
            continue;
        }
        // an interrupted run of the same inputs resumes; anything else starts over
        let resume = !opts.restart
            && previous.as_ref().is_some_and(|r| r.input_hash == input_hash && r.status != StageStatus::Done)
            || damaged.is_some();
        let reason = match (&previous, &upstream_reran) {
            _ if damaged.is_some() => damaged.clone().unwrap_or_default(),
            (_, Some(u)) => format!("upstream stage '{u}' re-ran"),
            (Some(r), _) if r.input_hash != input_hash => "its config or inputs changed".to_string(),
            (Some(r), _) if r.status != StageStatus::Done => format!("resuming an interrupted run (was {})", r.status),
            _ => "first run".to_string(),
        };
        tracing::info!("stage {} ({}): running — {reason}", s.name, s.kind);
        // all ranks have decided from the same records before rank 0 changes them
        world.barrier()?;
        let mut rec = StageRecord {
            status: StageStatus::Running,
            config_hash: plan.config_hash.clone(),
            input_hash: input_hash.clone(),
            config: plan.config_json.clone(),
            inputs: plan.inputs.clone(),
            data: plan.data.clone(),
            tokenizer_hash: plan.tokenizer_hash.clone(),
            started_at: Some(now()),
            command: opts.command.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..StageRecord::new(&s.name, s.kind)
        };
        if main {
            write_record(&dir, &rec)?;
            mark_downstream_stale(p, s)?;
        }
        let started = Instant::now();
        let result = if main || s.kind.trains() { run_stage(p, s, &plan, !resume) } else { Ok((None, None)) };
        if !s.kind.trains() {
            // the others wait for what rank 0 made
            world.barrier()?;
        }
        rec.duration_seconds = Some(started.elapsed().as_secs_f64());
        rec.finished_at = Some(now());
        match result {
            Ok((summary, eval)) => {
                rec.status = StageStatus::Done;
                rec.summary = summary;
                rec.eval = eval;
                let out = stage_output(p, s, plan.input.as_ref(), &rec);
                rec.output_hash = out.as_ref().map(|o| o.hash.clone());
                if main {
                    write_record(&dir, &rec)?;
                }
                if let Some(o) = out {
                    note_tokenizer(p, s, &o, &mut pipeline_tokenizer)?;
                    produced.insert(s.name.clone(), o);
                    upstream_reran = Some(s.name.clone());
                }
                outcomes.push((s.name.clone(), StageOutcome::Ran));
            }
            Err(e) => {
                rec.status = StageStatus::Failed;
                rec.error = Some(format!("{e:#}"));
                if main {
                    write_record(&dir, &rec)?;
                }
                return Err(e.context(format!("stage '{}' ({}) failed", s.name, s.kind)));
            }
        }
    }
    Ok(outcomes)
}

/// Runs `f` on rank 0 first and on the other ranks once it is done: for steps that make a folder
/// once and reuse it after (the starting model, a merged adapter), so one rank writes it. In one
/// process, just `f`.
pub(crate) fn main_first<T>(f: impl Fn() -> Result<T>) -> Result<T> {
    let world = align_core::dist::world();
    if world.size() == 1 {
        return f();
    }
    if world.is_main() {
        let out = f()?;
        world.barrier()?;
        Ok(out)
    } else {
        world.barrier()?;
        f()
    }
}

/// What a stage runs on and what decides whether it is up to date.
pub(crate) struct StagePlan {
    /// The model it trains or evaluates (none for tokenizer and init stages).
    pub(crate) input: Option<Produced>,
    pub(crate) cfg: Option<LoadedConfig>,
    /// Init stages: the tokenizer folder the model gets.
    pub(crate) tokenizer_dir: Option<PathBuf>,
    pub(crate) config_json: Value,
    pub(crate) config_hash: String,
    pub(crate) inputs: Vec<Value>,
    pub(crate) data: Vec<Value>,
    pub(crate) tokenizer_hash: Option<String>,
}

/// A defaults.tokenizer stage's output becomes the tokenizer every trained model must share.
pub(crate) fn note_tokenizer(
    p: &Pipeline,
    s: &StageSpec,
    out: &Produced,
    pipeline_tokenizer: &mut Option<String>,
) -> Result<()> {
    if p.tokenizer == Some(TokenizerSource::Stage(s.name.clone())) {
        *pipeline_tokenizer = Some(tokenizer_hash(&out.model)?);
    }
    Ok(())
}

/// The plan of a tokenizer stage (its config: vocab_size, min_frequency; its data) or an init
/// stage (its inputs: the model description and the tokenizer).
pub(crate) fn plan_made_stage(p: &Pipeline, s: &StageSpec, produced: &BTreeMap<String, Produced>) -> Result<StagePlan> {
    let mut config = s.table.clone();
    config.remove("data");
    if s.kind == StageKind::Tokenizer {
        config.entry("min_frequency").or_insert(toml::Value::Integer(2));
    }
    let config_json = serde_json::to_value(&config)?;
    let config_hash = sha256_hex(canonical_json(&config_json).as_bytes());
    let mut plan = StagePlan {
        input: None,
        cfg: None,
        tokenizer_dir: None,
        config_json,
        config_hash,
        inputs: Vec::new(),
        data: data_hashes(s)?,
        tokenizer_hash: None,
    };
    if s.kind == StageKind::Init {
        let desc = s.description.as_ref().ok_or_else(|| anyhow!("stage '{}': no model description", s.name))?;
        let source = s
            .tokenizer
            .as_ref()
            .or(p.tokenizer.as_ref())
            .ok_or_else(|| anyhow!("stage[{}] ({}).tokenizer: missing", s.index, s.name))?;
        let (tok_dir, tok_hash) = match source {
            TokenizerSource::Folder(d) => (d.clone(), content_hash(d)?),
            TokenizerSource::Stage(t) => {
                let o = produced.get(t).ok_or_else(|| {
                    anyhow!("stage '{}' needs the tokenizer of stage '{t}', which has not produced one", s.name)
                })?;
                (o.model.clone(), o.hash.clone())
            }
        };
        plan.inputs = vec![
            json!({"role": "description", "path": desc.display().to_string(), "hash": content_hash(desc)?}),
            json!({"role": "tokenizer", "path": tok_dir.display().to_string(), "hash": tok_hash}),
        ];
        plan.tokenizer_hash = Some(tokenizer_hash(&tok_dir)?);
        plan.tokenizer_dir = Some(tok_dir);
    }
    Ok(plan)
}

/// The plan of a training or eval stage: its config with the input model, reference and reward
/// model filled in, and their hashes.
pub(crate) fn plan_model_stage(
    p: &Pipeline,
    s: &StageSpec,
    input: Produced,
    tok_hash: String,
    produced: &BTreeMap<String, Produced>,
) -> Result<StagePlan> {
    let mut spec = s.clone();
    let reference = match (&s.reference, s.kind) {
        (Some(r), _) => Some(produced.get(r).cloned().ok_or_else(|| {
            anyhow!("stage '{}' needs '{r}' as its reference, which has not produced a model", s.name)
        })?),
        (None, StageKind::Dpo) if input.adapter.is_some() => Some(input.clone()),
        _ => None,
    };
    let mut extra_inputs = Vec::new();
    if let Some(reference) = reference {
        let r = if reference.adapter.is_some() { main_first(|| merged(&reference))? } else { reference };
        set_path(
            &mut spec.table,
            &[s.kind.to_string(), "reference".to_string()],
            toml::Value::String(r.model.display().to_string()),
        )?;
        extra_inputs.push(json!({"role": "reference", "path": r.model.display().to_string(), "hash": r.hash}));
    }
    if let Some(t_stage) = &s.teacher {
        let t = produced.get(t_stage).cloned().ok_or_else(|| {
            anyhow!("stage '{}' needs '{t_stage}' as its teacher, which has not produced a model", s.name)
        })?;
        let t = if t.adapter.is_some() { merged(&t)? } else { t };
        set_path(
            &mut spec.table,
            &[s.kind.to_string(), "teacher".to_string()],
            toml::Value::String(t.model.display().to_string()),
        )?;
        extra_inputs.push(json!({"role": "teacher", "path": t.model.display().to_string(), "hash": t.hash}));
    }
    if let Some(rm_stage) = &s.reward_model {
        let rm = produced.get(rm_stage).cloned().ok_or_else(|| {
            anyhow!("stage '{}' needs '{rm_stage}' as its reward model, which has not produced a model", s.name)
        })?;
        let rm = match &rm.adapter {
            // virtual tokens are not weights to merge: the stage reads the adapter folder itself
            // (its base from base_model_name_or_path, the tokens attached)
            Some(a) if align_core::peft::prompt::is_prompt_adapter(a)? => {
                Produced { model: a.clone(), adapter: None, hash: rm.hash.clone() }
            }
            Some(_) => main_first(|| merged(&rm))?,
            None => rm,
        };
        set_path(
            &mut spec.table,
            &[s.kind.to_string(), "reward_model".to_string()],
            toml::Value::String(rm.model.display().to_string()),
        )?;
        extra_inputs.push(json!({"role": "reward_model", "path": rm.model.display().to_string(), "hash": rm.hash}));
    }
    let cfg = if s.kind == StageKind::Eval {
        None
    } else {
        Some(p.stage_config(&spec, &input.model, input.adapter.as_deref())?)
    };
    let config_json = match &cfg {
        Some(c) => serde_json::to_value(&c.config)?,
        None => serde_json::to_value(&s.table)?,
    };
    let config_hash =
        cfg.as_ref().map(|c| c.hash.clone()).unwrap_or_else(|| sha256_hex(canonical_json(&config_json).as_bytes()));
    let mut inputs = vec![
        json!({"role": "model", "path": input.model.display().to_string(), "adapter": input.adapter.as_ref().map(|a| a.display().to_string()), "hash": input.hash}),
    ];
    inputs.extend(extra_inputs);
    Ok(StagePlan {
        input: Some(input),
        cfg,
        tokenizer_dir: None,
        config_json,
        config_hash,
        inputs,
        data: data_hashes(s)?,
        tokenizer_hash: Some(tok_hash),
    })
}

/// The model a stage trains from: its input, except that a reward stage, which starts from a full
/// causal LM, gets a LoRA input merged (cached next to the adapter).
pub(crate) fn trained_from(s: &StageSpec, input: Produced) -> Result<Produced> {
    if s.kind == StageKind::Reward && input.adapter.is_some() {
        main_first(|| merged(&input))
    } else {
        Ok(input)
    }
}

/// Why a done stage's output cannot be used as it is (None when it is intact): `final/` of a
/// training, tokenizer or init stage missing or not what was recorded (the hash covers every file),
/// an eval stage's results missing from its record.
pub(crate) fn damaged_output(p: &Pipeline, s: &StageSpec, rec: &StageRecord) -> Option<String> {
    if s.kind == StageKind::Eval {
        return rec.eval.is_none().then(|| "its record holds no results".to_string());
    }
    let final_dir = p.stage_dir(s).join("final");
    if !final_dir.is_dir() {
        return Some(format!("its output {} is missing", final_dir.display()));
    }
    match (&rec.output_hash, content_hash(&final_dir)) {
        (Some(want), Ok(got)) if *want != got => {
            Some(format!("its output {} changed or is incomplete", final_dir.display()))
        }
        (_, Err(e)) => Some(format!("its output {} cannot be read ({e:#})", final_dir.display())),
        _ => None,
    }
}

/// What a finished stage passes to the stages after it: its `final/` folder (a LoRA stage passes
/// its base model plus the adapter).
pub(crate) fn stage_output(
    p: &Pipeline,
    s: &StageSpec,
    input: Option<&Produced>,
    rec: &StageRecord,
) -> Option<Produced> {
    if s.kind == StageKind::Eval {
        return None;
    }
    let final_dir = p.stage_dir(s).join("final");
    if !final_dir.is_dir() {
        return None;
    }
    let hash = rec.output_hash.clone().or_else(|| content_hash(&final_dir).ok())?;
    if final_dir.join(align_core::peft::lora::ADAPTER_CONFIG_FILE).is_file() {
        Some(Produced { model: input?.model.clone(), adapter: Some(final_dir), hash })
    } else {
        Some(Produced { model: final_dir, adapter: None, hash })
    }
}
