//! The pipeline runner: one TOML file chains stages (pretrain → sft → … → eval) in a run
//! directory with lineage. A stage whose config and inputs are unchanged is skipped; a changed
//! stage re-runs and what follows it becomes stale; an interrupted stage resumes from its last
//! checkpoint through the stage's own exact resume.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use align_core::text::chat::strftime;
use align_core::load::spec::{AdapterMode, ModelSpec};
use align_core::data::{expand_data_paths, read_preference, read_prompts, read_sft, read_text_records, DataOptions};
use align_core::train::config::{canonical_json, parse_override, set_path, sha256_file, sha256_hex, LoadedConfig};
use align_core::train::trainer::TrainSummary;

/// Stage kinds the runner knows.
pub const KINDS: &[&str] = &["pretrain", "sft", "reward", "dpo", "ppo", "eval"];
const STAGE_KEYS: &[&str] =
    &["name", "kind", "from", "reward_model", "reference", "eval", "allow_tokenizer_mismatch", "max_new_tokens"];
const DEFAULT_ONLY_KEYS: &[&str] = &["init", "tokenizer", "device", "dtype", "seed", "threads"];

/// One stage as written in the pipeline file, with its position.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub index: usize,
    pub name: String,
    pub kind: String,
    pub from: Option<String>,
    pub reward_model: Option<String>,
    pub reference: Option<String>,
    /// `eval` stages: which evaluation (`perplexity`).
    pub eval: Option<String>,
    pub allow_tokenizer_mismatch: bool,
    /// The train-config keys of the stage (defaults merged in, stage keys removed).
    pub table: toml::Table,
}

/// A parsed and validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub run_dir: PathBuf,
    pub file: PathBuf,
    pub init: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub base_model: Option<String>,
    pub stages: Vec<StageSpec>,
}

/// `stage.json`: a stage's status and lineage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub kind: String,
    pub status: String,
    pub stale_reason: Option<String>,
    pub config_hash: String,
    /// Hash over the config and every input (models, data, tokenizer): equal means up to date.
    pub input_hash: String,
    pub config: Value,
    pub inputs: Vec<Value>,
    pub data: Vec<Value>,
    pub tokenizer_hash: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_seconds: Option<f64>,
    pub summary: Option<TrainSummary>,
    pub eval: Option<Value>,
    /// Content hash of what the stage produced (its `final/` folder), for the stages after it.
    pub output_hash: Option<String>,
    pub error: Option<String>,
    pub command: String,
    pub version: String,
}

fn now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime("%Y-%m-%dT%H:%M:%SZ", secs)
}

fn table_at<'a>(t: &'a toml::Table, key: &str, at: &str) -> Result<Option<&'a toml::Table>> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::Table(x)) => Ok(Some(x)),
        Some(other) => bail!("{at}{key}: expected a table, found {}", other.type_str()),
    }
}

fn string_at(t: &toml::Table, key: &str, at: &str) -> Result<Option<String>> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{at}.{key}: expected a string, found {}", other.type_str()),
    }
}

/// Deep-merges `over` into `base` (tables merge, everything else replaces).
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Pipeline {
    /// Reads and validates a pipeline file; `overrides` are `--set` values (`stage.NAME.key=…`,
    /// `defaults.key=…`, `pipeline.run_dir=…`). Every error names its key path.
    pub fn load(file: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
        let mut doc: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {}", file.display(), e.to_string().trim()))?;
        let at = format!("{}: ", file.display());
        // --set stage.NAME.… addresses the stage table with that name
        for o in overrides {
            let (path, value) = parse_override(o)?;
            if path.first().map(String::as_str) == Some("stage") && path.len() >= 3 {
                let stages = doc
                    .get_mut("stage")
                    .and_then(|s| s.as_array_mut())
                    .ok_or_else(|| anyhow!("{at}--set {o}: the pipeline has no stages"))?;
                let stage = stages
                    .iter_mut()
                    .filter_map(|s| s.as_table_mut())
                    .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(path[1].as_str()))
                    .ok_or_else(|| anyhow!("{at}--set {o}: no stage named '{}'", path[1]))?;
                set_path(stage, &path[2..], value)?;
            } else {
                set_path(&mut doc, &path, value)?;
            }
        }
        for key in doc.keys() {
            if !["pipeline", "defaults", "stage"].contains(&key.as_str()) {
                bail!("{at}unknown key '{key}' (expected [pipeline], [defaults] and [[stage]] tables)");
            }
        }
        let head = table_at(&doc, "pipeline", &at)?.ok_or_else(|| anyhow!("{at}missing [pipeline] table"))?;
        for key in head.keys() {
            if !["name", "run_dir"].contains(&key.as_str()) {
                bail!("{at}pipeline.{key}: unknown key (expected name, run_dir)");
            }
        }
        let name =
            string_at(head, "name", &format!("{at}pipeline"))?.ok_or_else(|| anyhow!("{at}pipeline.name: missing"))?;
        let run_dir = PathBuf::from(
            string_at(head, "run_dir", &format!("{at}pipeline"))?
                .ok_or_else(|| anyhow!("{at}pipeline.run_dir: missing"))?,
        );
        let defaults = table_at(&doc, "defaults", &at)?.cloned().unwrap_or_default();
        let dat = format!("{at}defaults");
        let init = string_at(&defaults, "init", &dat)?.map(PathBuf::from);
        let tokenizer = string_at(&defaults, "tokenizer", &dat)?.map(PathBuf::from);
        let base_model = string_at(&defaults, "model", &dat)?;
        if init.is_some() == base_model.is_some() {
            bail!("{at}defaults: give exactly one of 'model' (a model folder) or 'init' (a model description for align init, with 'tokenizer')");
        }
        if init.is_some() && tokenizer.is_none() {
            bail!("{at}defaults.tokenizer: required with defaults.init");
        }
        for p in init.iter().chain(tokenizer.iter()) {
            if !p.exists() {
                bail!("{at}defaults: {} not found", p.display());
            }
        }
        // defaults shared by every stage's train config
        let mut shared = toml::Table::new();
        for (k, v) in &defaults {
            match k.as_str() {
                "init" | "tokenizer" | "model" => {}
                "device" | "dtype" | "seed" | "threads" => {
                    set_path(&mut shared, &["train".to_string(), k.clone()], v.clone())?;
                }
                _ => {
                    shared.insert(k.clone(), v.clone());
                }
            }
        }
        let raw_stages = match doc.get("stage") {
            Some(toml::Value::Array(a)) if !a.is_empty() => a.clone(),
            _ => bail!("{at}no [[stage]] tables"),
        };
        let mut stages: Vec<StageSpec> = Vec::new();
        for (i, raw) in raw_stages.iter().enumerate() {
            let sat = format!("{at}stage[{i}]");
            let t = raw.as_table().ok_or_else(|| anyhow!("{sat}: expected a table"))?;
            let name = string_at(t, "name", &sat)?.ok_or_else(|| anyhow!("{sat}.name: missing"))?;
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                bail!("{sat}.name: '{name}' is not usable as a folder name");
            }
            if stages.iter().any(|s| s.name == name) {
                bail!("{sat}.name: a stage named '{name}' already exists");
            }
            let kind = string_at(t, "kind", &sat)?.ok_or_else(|| anyhow!("{sat}.kind: missing"))?;
            if !KINDS.contains(&kind.as_str()) {
                bail!("{sat}.kind: unknown kind '{kind}' (expected one of {})", KINDS.join(", "));
            }
            let refer = |key: &str| -> Result<Option<String>> {
                let Some(target) = string_at(t, key, &sat)? else { return Ok(None) };
                if stages.iter().any(|s| s.name == target) {
                    return Ok(Some(target));
                }
                if raw_stages.iter().skip(i).any(|s| s.get("name").and_then(|n| n.as_str()) == Some(target.as_str())) {
                    bail!("{sat}.{key}: '{target}' is this stage or a later one (stages may only use earlier stages, so there are no cycles)");
                }
                bail!("{sat}.{key}: unknown stage '{target}'");
            };
            let from = refer("from")?;
            let reward_model = refer("reward_model")?;
            let reference = refer("reference")?;
            let external_rm = t.get("ppo").and_then(|p| p.get("reward_model")).is_some();
            if kind == "ppo" && reward_model.is_none() && !external_rm {
                bail!("{sat}.reward_model: a ppo stage needs a reward model (the name of an earlier reward stage, or a folder as ppo.reward_model)");
            }
            if kind == "ppo" && reward_model.is_some() && external_rm {
                bail!("{sat}.ppo.reward_model: give the reward model once (stage reward_model = STAGE, or ppo.reward_model = FOLDER)");
            }
            if let Some(rm) = &reward_model {
                if stages.iter().any(|s| &s.name == rm && s.kind != "reward") {
                    bail!("{sat}.reward_model: stage '{rm}' is not a reward stage");
                }
            }
            let eval = string_at(t, "eval", &sat)?;
            if kind == "eval" && !matches!(eval.as_deref(), Some("perplexity") | Some("answers")) {
                bail!("{sat}.eval: expected \"perplexity\" or \"answers\", found {:?}", eval);
            }
            let allow_tokenizer_mismatch = t.get("allow_tokenizer_mismatch").and_then(|v| v.as_bool()).unwrap_or(false);
            let mut table = shared.clone();
            let mut own = t.clone();
            for k in STAGE_KEYS {
                own.remove(*k);
            }
            for k in DEFAULT_ONLY_KEYS {
                if own.contains_key(*k) {
                    bail!("{sat}.{k}: only allowed in [defaults] (use train.{k} in a stage)");
                }
            }
            merge(&mut table, &own);
            // data files must exist, and be of the right kind
            let data: Vec<String> = table
                .get("data")
                .and_then(|d| d.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            if data.is_empty() {
                bail!("{sat}.data: expected at least one data file");
            }
            expand_data_paths(&data).map_err(|e| anyhow!("{sat}.data: {e}"))?;
            if kind == "dpo" || kind == "reward" {
                read_preference(&data, &DataOptions::default())
                    .map_err(|e| anyhow!("{sat}.data: a {kind} stage needs preference data: {e}"))?;
            }
            if kind == "ppo" {
                read_prompts(&data, &DataOptions::default())
                    .map_err(|e| anyhow!("{sat}.data: a ppo stage needs prompt data: {e}"))?;
            }
            if kind == "eval" && eval.as_deref() == Some("perplexity") {
                for f in expand_data_paths(&data)? {
                    read_text_records(&f).map_err(|e| anyhow!("{sat}.data: {e}"))?;
                }
            }
            if kind == "eval" && eval.as_deref() == Some("answers") {
                read_sft(&data, &DataOptions::default())
                    .map_err(|e| anyhow!("{sat}.data: an answers evaluation needs conversations: {e}"))?;
            }
            stages.push(StageSpec {
                index: i,
                name,
                kind,
                from,
                reward_model,
                reference,
                eval,
                allow_tokenizer_mismatch,
                table,
            });
        }
        let p = Pipeline { name, run_dir, file: file.to_path_buf(), init, tokenizer, base_model, stages };
        // every training stage's config and own section must parse (unknown keys, bad values)
        // before anything runs
        for s in &p.stages {
            if s.kind != "eval" {
                let cfg = p.stage_config(s, Path::new("MODEL"), None);
                cfg.and_then(|c| check_stage_section(&c))
                    .map_err(|e| anyhow!("{at}stage[{}] ({}): {e}", s.index, s.name))?;
            }
        }
        Ok(p)
    }

    pub fn stage_dir(&self, s: &StageSpec) -> PathBuf {
        self.run_dir.join(&s.name)
    }

    /// The stage's train config with its input model (and adapter) and output folder filled in.
    pub fn stage_config(&self, s: &StageSpec, model: &Path, adapter: Option<&Path>) -> Result<LoadedConfig> {
        let mut t = s.table.clone();
        t.insert("model".into(), toml::Value::String(model.display().to_string()));
        if let Some(a) = adapter {
            t.insert("adapter".into(), toml::Value::String(a.display().to_string()));
        }
        t.insert("output_dir".into(), toml::Value::String(self.stage_dir(s).display().to_string()));
        LoadedConfig::from_table(t, &self.file, &[], &s.kind)
    }
}

/// Deserialises (and where the stage has checks, validates) a stage's own section, so unknown
/// keys and bad values are reported before anything trains.
fn check_stage_section(cfg: &LoadedConfig) -> Result<()> {
    match cfg.stage_name.as_str() {
        "pretrain" => cfg.stage_section::<align_pretrain::PretrainSection>().map(|_| ()),
        "sft" => cfg.stage_section::<align_sft::SftSection>().map(|_| ()),
        "reward" => cfg.stage_section::<align_reward::RewardSection>().map(|_| ()),
        "dpo" => {
            let d: align_rlhf::DpoSection = cfg.stage_section()?;
            d.params().validate().map_err(|e| anyhow!("[dpo] {e}"))
        }
        "ppo" => {
            // the reward model is filled in at run time from the stage it names
            let mut c = cfg.clone();
            c.stage.entry("reward_model").or_insert(toml::Value::String("REWARD_MODEL".into()));
            let section: align_rlhf::PpoSection = c.stage_section()?;
            section.validate().map_err(|e| anyhow!("[ppo] {e}"))
        }
        _ => Ok(()),
    }
}

/// SHA-256 over every file of a folder (names and contents, sorted), or of one file.
pub fn content_hash(path: &Path) -> Result<String> {
    let mut files = Vec::new();
    if path.is_dir() {
        collect_files(path, path, &mut files)?;
    } else {
        files.push((path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), path.to_path_buf()));
    }
    files.sort();
    let mut acc = String::new();
    for (rel, full) in files {
        acc.push_str(&format!("{rel}:{};", sha256_file(&full)?));
    }
    Ok(sha256_hex(acc.as_bytes()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else {
            out.push((p.strip_prefix(root).unwrap_or(&p).display().to_string(), p));
        }
    }
    Ok(())
}

/// Hash of what decides tokenisation: tokenizer.json, tokenizer_config.json, chat template.
pub fn tokenizer_hash(dir: &Path) -> Result<String> {
    let mut acc = String::new();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        let p = dir.join(f);
        if p.is_file() {
            acc.push_str(&format!("{f}:{};", sha256_file(&p)?));
        }
    }
    if acc.is_empty() {
        bail!("{}: no tokenizer files", dir.display());
    }
    Ok(sha256_hex(acc.as_bytes()))
}

fn read_record(path: &Path) -> Option<StageRecord> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_record(dir: &Path, rec: &StageRecord) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".stage.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(rec)? + "\n")?;
    std::fs::rename(&tmp, dir.join("stage.json"))?;
    Ok(())
}

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
struct Produced {
    model: PathBuf,
    adapter: Option<PathBuf>,
    hash: String,
}

/// Runs the pipeline; returns each stage's outcome in order.
pub fn run(p: &Pipeline, opts: &RunOptions) -> Result<Vec<(String, StageOutcome)>> {
    std::fs::create_dir_all(&p.run_dir).with_context(|| format!("{}: cannot create", p.run_dir.display()))?;
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    for sel in opts.from.iter().chain(opts.only.iter()) {
        if !names.contains(&sel.as_str()) {
            bail!("no stage named '{sel}' (stages: {})", names.join(", "));
        }
    }
    std::fs::write(
        p.run_dir.join("pipeline.json"),
        serde_json::to_string_pretty(&json!({"name": p.name, "stages": names, "file": p.file.display().to_string()}))?
            + "\n",
    )?;
    // the starting model: a given folder, or one `align init` makes from a description
    let base = match (&p.base_model, &p.init, &p.tokenizer) {
        (Some(m), _, _) => {
            let dir = align_core::hf::checkpoint::resolve_model_dir(m)?;
            Produced { hash: content_hash(&dir)?, model: dir, adapter: None }
        }
        (None, Some(init), Some(tok)) => init_model(p, init, tok)?,
        _ => bail!("defaults: no starting model"),
    };
    let pipeline_tokenizer = tokenizer_hash(p.tokenizer.as_deref().unwrap_or(&base.model))?;
    let mut produced: BTreeMap<String, Produced> = BTreeMap::new();
    let mut outcomes = Vec::new();
    let mut upstream_reran: Option<String> = None;
    let from_index = opts.from.as_ref().and_then(|f| names.iter().position(|n| n == f)).unwrap_or(0);
    for s in &p.stages {
        let dir = p.stage_dir(s);
        let previous = read_record(&dir.join("stage.json"));
        let input = match &s.from {
            Some(f) => produced.get(f).cloned().ok_or_else(|| {
                anyhow!("stage '{}' needs '{f}', which has not produced a model (run it first)", s.name)
            })?,
            None => base.clone(),
        };
        let selected = s.index >= from_index && opts.only.as_ref().is_none_or(|o| o == &s.name);
        if !selected {
            // an unselected stage still passes on what it produced earlier
            if let Some(prev) = previous.filter(|r| r.status == "done") {
                if let Some(out) = stage_output(p, s, &trained_from(s, input)?, &prev) {
                    produced.insert(s.name.clone(), out);
                }
            }
            outcomes.push((s.name.clone(), StageOutcome::NotSelected));
            continue;
        }
        let tok_hash = tokenizer_hash(&input.model)?;
        if tok_hash != pipeline_tokenizer && !s.allow_tokenizer_mismatch {
            bail!(
                "stage[{}] ({}): its input model {} has a different tokenizer or chat template than the pipeline's (set allow_tokenizer_mismatch = true to accept)",
                s.index,
                s.name,
                input.model.display()
            );
        }
        let input = trained_from(s, input)?;
        let mut spec = s.clone();
        let reference = match (&s.reference, s.kind.as_str()) {
            (Some(r), _) => Some(produced.get(r).cloned().ok_or_else(|| {
                anyhow!("stage '{}' needs '{r}' as its reference, which has not produced a model", s.name)
            })?),
            (None, "dpo") if input.adapter.is_some() => Some(input.clone()),
            _ => None,
        };
        let mut spec_reference_input = None;
        if let Some(reference) = reference {
            let reference = if reference.adapter.is_some() { merged(&reference)? } else { reference };
            spec_reference_input = Some(reference.clone());
            set_path(
                &mut spec.table,
                &[s.kind.clone(), "reference".to_string()],
                toml::Value::String(reference.model.display().to_string()),
            )?;
        }
        let mut extra_inputs = Vec::new();
        if let Some(r) = &spec_reference_input {
            extra_inputs.push(json!({"role": "reference", "path": r.model.display().to_string(), "hash": r.hash}));
        }
        if let Some(rm_stage) = &s.reward_model {
            let rm = produced.get(rm_stage).cloned().ok_or_else(|| {
                anyhow!("stage '{}' needs '{rm_stage}' as its reward model, which has not produced a model", s.name)
            })?;
            let rm = if rm.adapter.is_some() { merged(&rm)? } else { rm };
            set_path(
                &mut spec.table,
                &[s.kind.clone(), "reward_model".to_string()],
                toml::Value::String(rm.model.display().to_string()),
            )?;
            extra_inputs.push(json!({"role": "reward_model", "path": rm.model.display().to_string(), "hash": rm.hash}));
        }
        let cfg = if s.kind == "eval" {
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
        let data_files = s
            .table
            .get("data")
            .and_then(|d| d.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect::<Vec<_>>())
            .unwrap_or_default();
        let mut data = Vec::new();
        for f in expand_data_paths(&data_files)? {
            data.push(json!({"path": f.display().to_string(), "hash": content_hash(&f)?}));
        }
        let mut inputs = vec![
            json!({"role": "model", "path": input.model.display().to_string(), "adapter": input.adapter.as_ref().map(|a| a.display().to_string()), "hash": input.hash}),
        ];
        inputs.extend(extra_inputs);
        let input_hash = sha256_hex(canonical_json(&json!({"config": config_hash, "inputs": inputs, "data": data, "tokenizer": tok_hash, "kind": s.kind, "eval": s.eval})).as_bytes());

        let up_to_date =
            !opts.restart && previous.as_ref().is_some_and(|r| r.status == "done" && r.input_hash == input_hash);
        if up_to_date {
            let prev = previous.as_ref().cloned().unwrap_or_default();
            if let Some(out) = stage_output(p, s, &input, &prev) {
                produced.insert(s.name.clone(), out);
            }
            tracing::info!("stage {} ({}): up to date, skipped", s.name, s.kind);
            outcomes.push((s.name.clone(), StageOutcome::Skipped));
            continue;
        }
        // an interrupted run of the same inputs resumes; anything else starts over
        let resume =
            !opts.restart && previous.as_ref().is_some_and(|r| r.input_hash == input_hash && r.status != "done");
        let reason = match (&previous, &upstream_reran) {
            (_, Some(u)) => format!("upstream stage '{u}' re-ran"),
            (Some(r), _) if r.input_hash != input_hash => "its config or inputs changed".to_string(),
            (Some(r), _) if r.status != "done" => format!("resuming an interrupted run (was {})", r.status),
            _ => "first run".to_string(),
        };
        tracing::info!("stage {} ({}): running — {reason}", s.name, s.kind);
        let mut rec = StageRecord {
            name: s.name.clone(),
            kind: s.kind.clone(),
            status: "running".into(),
            config_hash: config_hash.clone(),
            input_hash: input_hash.clone(),
            config: config_json,
            inputs,
            data,
            tokenizer_hash: Some(tok_hash),
            started_at: Some(now()),
            command: opts.command.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        write_record(&dir, &rec)?;
        mark_downstream_stale(p, s)?;
        let started = Instant::now();
        let result = run_stage(s, cfg.as_ref(), &input, !resume);
        rec.duration_seconds = Some(started.elapsed().as_secs_f64());
        rec.finished_at = Some(now());
        match result {
            Ok((summary, eval)) => {
                rec.status = "done".into();
                rec.summary = summary;
                rec.eval = eval;
                let out = stage_output(p, s, &input, &rec);
                rec.output_hash = match &out {
                    Some(o) => Some(o.hash.clone()),
                    None => None,
                };
                write_record(&dir, &rec)?;
                if let Some(o) = out {
                    produced.insert(s.name.clone(), o);
                    upstream_reran = Some(s.name.clone());
                }
                outcomes.push((s.name.clone(), StageOutcome::Ran));
            }
            Err(e) => {
                rec.status = "failed".into();
                rec.error = Some(format!("{e:#}"));
                write_record(&dir, &rec)?;
                return Err(e.context(format!("stage '{}' ({}) failed", s.name, s.kind)));
            }
        }
    }
    Ok(outcomes)
}

/// The model a stage trains from: its input, except that a reward stage, which starts from a full
/// causal LM, gets a LoRA input merged (cached next to the adapter).
fn trained_from(s: &StageSpec, input: Produced) -> Result<Produced> {
    if s.kind == "reward" && input.adapter.is_some() {
        merged(&input)
    } else {
        Ok(input)
    }
}

/// What a finished stage passes to the stages after it: its `final/` folder (a LoRA stage passes
/// its base model plus the adapter).
fn stage_output(p: &Pipeline, s: &StageSpec, input: &Produced, rec: &StageRecord) -> Option<Produced> {
    if s.kind == "eval" {
        return None;
    }
    let final_dir = p.stage_dir(s).join("final");
    if !final_dir.is_dir() {
        return None;
    }
    let hash = rec.output_hash.clone().or_else(|| content_hash(&final_dir).ok())?;
    if final_dir.join(align_core::peft::lora::ADAPTER_CONFIG_FILE).is_file() {
        Some(Produced { model: input.model.clone(), adapter: Some(final_dir), hash })
    } else {
        Some(Produced { model: final_dir, adapter: None, hash })
    }
}

fn mark_downstream_stale(p: &Pipeline, s: &StageSpec) -> Result<()> {
    for later in p.stages.iter().filter(|l| l.index > s.index) {
        let path = p.stage_dir(later).join("stage.json");
        if let Some(mut r) = read_record(&path) {
            if r.status == "done" {
                r.status = "stale".into();
                r.stale_reason = Some(format!("upstream stage '{}' is re-running", s.name));
                write_record(&p.stage_dir(later), &r)?;
            }
        }
    }
    Ok(())
}

fn run_stage(
    s: &StageSpec,
    cfg: Option<&LoadedConfig>,
    input: &Produced,
    restart: bool,
) -> Result<(Option<TrainSummary>, Option<Value>)> {
    match (s.kind.as_str(), cfg) {
        ("pretrain", Some(c)) => Ok((Some(align_pretrain::run(c, restart, None)?), None)),
        ("sft", Some(c)) => Ok((Some(align_sft::run(c, restart, None)?), None)),
        ("reward", Some(c)) => Ok((Some(align_reward::run(c, restart, None)?), None)),
        ("dpo", Some(c)) => Ok((Some(align_rlhf::run_dpo(c, restart, None)?), None)),
        ("ppo", Some(c)) => Ok((Some(align_rlhf::run_ppo(c, restart, None)?), None)),
        ("eval", _) => Ok((None, Some(run_eval(s, input)?))),
        (kind, _) => bail!("kind '{kind}' is not available in this build yet"),
    }
}

fn run_eval(s: &StageSpec, input: &Produced) -> Result<Value> {
    use align_core::infer::logprobs::corpus_perplexity;
    let device = align_core::model::device::parse_device(
        s.table.get("train").and_then(|t| t.get("device")).and_then(|d| d.as_str()).unwrap_or("auto"),
    )?;
    let dtype = s.table.get("train").and_then(|t| t.get("dtype")).and_then(|d| d.as_str());
    let kind = align_core::model::device::parse_dtype(dtype, device)?;
    let spec = ModelSpec::at(&input.model, input.adapter.as_deref(), device, kind);
    let loaded = spec.causal_lm(AdapterMode::Attach)?;
    let (m, tok) = (&loaded.model, &loaded.tokenizer);
    let files: Vec<String> = s
        .table
        .get("data")
        .and_then(|d| d.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let train = s.table.get("train");
    let int = |key: &str, default: i64| {
        train.and_then(|t| t.get(key)).and_then(|v| v.as_integer()).unwrap_or(default).max(1) as usize
    };
    if s.eval.as_deref() == Some("answers") {
        let conversations = read_sft(&files, &DataOptions::default())?.records;
        let cases = conversations.iter().map(align_core::eval::answers::answer_case).collect::<Result<Vec<_>>>()?;
        let max_new = s.table.get("max_new_tokens").and_then(|v| v.as_integer()).unwrap_or(64).max(1) as usize;
        let r = tch::no_grad(|| {
            align_core::eval::answers::evaluate_answers(&m.lm, tok, &cases, max_new, int("batch_size", 8))
        })?;
        let sc = r.scores;
        tracing::info!(
            "stage {}: BLEU-4 {:.4}, ROUGE-L {:.4}, char F1 {:.4} over {} answers",
            s.name,
            sc.bleu4,
            sc.rouge_l,
            sc.char_f1,
            sc.samples
        );
        let examples: Vec<Value> = r
            .answered
            .iter()
            .take(5)
            .map(|a| json!({"prompt": a.prompt, "reference": a.reference, "answer": a.answer}))
            .collect();
        return Ok(
            json!({"eval": "answers", "model": input.model.display().to_string(), "bleu4": sc.bleu4, "rouge_l": sc.rouge_l, "char_f1": sc.char_f1, "samples": sc.samples, "examples": examples}),
        );
    }
    let mut texts = Vec::new();
    for f in expand_data_paths(&files)? {
        texts.extend(read_text_records(&f)?.into_iter().map(|r| r.text));
    }
    let r = tch::no_grad(|| corpus_perplexity(&m.lm, tok, &texts, int("max_length", 1024), 8192))?;
    tracing::info!("stage {}: perplexity {:.3} over {} tokens", s.name, r.perplexity, r.tokens);
    Ok(
        json!({"eval": "perplexity", "model": input.model.display().to_string(), "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "records": r.records}),
    )
}

/// A plain model folder for base + adapter: the adapter merged into the weights (a reward-model
/// adapter gives a `*ForSequenceClassification` folder), written once to
/// `<adapter folder>/../merged` and reused while the adapter's content hash is the same.
fn merged(input: &Produced) -> Result<Produced> {
    let Some(adapter) = &input.adapter else { return Ok(input.clone()) };
    let dir = adapter.parent().unwrap_or(adapter).join("merged");
    let marker = dir.join(".merged_from");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(input.hash.as_str()) {
        tracing::info!("merging {} into {} → {}", adapter.display(), input.model.display(), dir.display());
        // the one merge path of `align export`: merged in f32, probe-checked, stored in the base's dtype
        align_core::load::merge::merge_adapter(&input.model, adapter, &dir, &align_core::load::merge::MergeOptions::default())?;
        std::fs::write(&marker, &input.hash)?;
    }
    Ok(Produced { model: dir, adapter: None, hash: input.hash.clone() })
}

/// Creates (or reuses) RUN_DIR/init from `defaults.init` and `defaults.tokenizer` with `align init`'s code.
fn init_model(p: &Pipeline, desc: &Path, tokenizer: &Path) -> Result<Produced> {
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
