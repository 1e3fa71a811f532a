//! The pipeline runner: one TOML file chains stages (pretrain → sft → … → eval) in a run
//! directory with lineage. A stage whose config and inputs are unchanged is skipped; a changed
//! stage re-runs and what follows it becomes stale; an interrupted stage resumes from its last
//! checkpoint through the stage's own exact resume.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use align_core::text::chat::strftime;
use align_core::load::spec::{AdapterMode, ModelSpec};
use align_core::data::{expand_data_paths, read_preference, read_prompts, read_sft, read_text_records, DataOptions};
use align_core::train::config::{canonical_json, parse_override, set_path, sha256_file, sha256_hex, LoadedConfig};
use align_runs::files::{PIPELINE_RECORD, STAGE_RECORD};
pub use align_runs::{StageKind, StageRecord, StageStatus, TrainSummary};

/// Keys of a `tokenizer` stage (it trains a byte-level BPE as `align tokenizer train` does).
const TOKENIZER_STAGE_KEYS: &[&str] = &["name", "kind", "data", "vocab_size", "min_frequency"];
/// Keys of an `init` stage (it random-initialises a model as `align init` does).
const INIT_STAGE_KEYS: &[&str] = &["name", "kind", "config", "tokenizer"];
const STAGE_KEYS: &[&str] =
    &["name", "kind", "from", "reward_model", "reference", "eval", "allow_tokenizer_mismatch", "max_new_tokens"];
const DEFAULT_ONLY_KEYS: &[&str] = &["init", "tokenizer", "device", "dtype", "seed", "threads"];

/// One stage as written in the pipeline file, with its position.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub index: usize,
    pub name: String,
    pub kind: StageKind,
    pub from: Option<String>,
    pub reward_model: Option<String>,
    pub reference: Option<String>,
    /// `eval` stages: which evaluation (`perplexity`).
    pub eval: Option<String>,
    pub allow_tokenizer_mismatch: bool,
    /// `init` stages: the model description (TOML).
    pub description: Option<PathBuf>,
    /// `init` stages: the tokenizer given in the stage (else the pipeline's `defaults.tokenizer`).
    pub tokenizer: Option<TokenizerSource>,
    /// The train-config keys of the stage (defaults merged in, stage keys removed); a
    /// `tokenizer` or `init` stage: its own keys.
    pub table: toml::Table,
}

impl StageSpec {
    /// A stage that makes its output from files (a tokenizer or a random-initialised model)
    /// rather than training or evaluating a model.
    pub fn makes_from_files(&self) -> bool {
        self.kind == StageKind::Tokenizer || self.kind == StageKind::Init
    }
}

/// Where a tokenizer comes from: a folder, or the output of a `tokenizer` stage.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    Folder(PathBuf),
    Stage(String),
}

/// `value` names an earlier tokenizer stage, or else must be an existing folder.
fn tokenizer_source(value: &str, earlier: &[StageSpec], at: &str) -> Result<TokenizerSource> {
    if let Some(s) = earlier.iter().find(|s| s.name == value) {
        if s.kind != StageKind::Tokenizer {
            bail!("{at}: stage '{value}' is a {} stage, not a tokenizer stage", s.kind);
        }
        return Ok(TokenizerSource::Stage(value.to_string()));
    }
    let dir = PathBuf::from(value);
    if !dir.is_dir() {
        bail!("{at}: '{value}' is neither an earlier tokenizer stage nor an existing tokenizer folder");
    }
    Ok(TokenizerSource::Folder(dir))
}

fn positive_int_at(t: &toml::Table, key: &str, at: &str, min: i64) -> Result<Option<i64>> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(n)) if *n >= min => Ok(Some(*n)),
        Some(other) => bail!("{at}.{key}: expected an integer ≥ {min}, found {other}"),
    }
}

/// A parsed and validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub run_dir: PathBuf,
    pub file: PathBuf,
    pub init: Option<PathBuf>,
    /// `defaults.tokenizer`: the pipeline's tokenizer (every trained model must use it).
    pub tokenizer: Option<TokenizerSource>,
    pub base_model: Option<String>,
    pub stages: Vec<StageSpec>,
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

/// Parses and checks a `tokenizer` or `init` stage (`earlier`: the stages before it).
fn made_stage_spec(
    t: &toml::Table,
    index: usize,
    name: String,
    kind: StageKind,
    sat: &str,
    earlier: &[StageSpec],
) -> Result<StageSpec> {
    let allowed = if kind == StageKind::Tokenizer { TOKENIZER_STAGE_KEYS } else { INIT_STAGE_KEYS };
    for key in t.keys() {
        if !allowed.contains(&key.as_str()) {
            bail!("{sat}.{key}: unknown key for a {kind} stage (expected {})", allowed.join(", "));
        }
    }
    let mut spec = StageSpec {
        index,
        name,
        kind,
        from: None,
        reward_model: None,
        reference: None,
        eval: None,
        allow_tokenizer_mismatch: false,
        description: None,
        tokenizer: None,
        table: t.clone(),
    };
    spec.table.remove("name");
    spec.table.remove("kind");
    if kind == StageKind::Tokenizer {
        let data: Vec<String> = match t.get("data") {
            Some(toml::Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("{sat}.data[{j}]: expected a file path string"))
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("{sat}.data: expected a list of files, found {}", other.type_str()),
            None => Vec::new(),
        };
        if data.is_empty() {
            bail!("{sat}.data: expected at least one training file");
        }
        expand_data_paths(&data).map_err(|e| anyhow!("{sat}.data: {e}"))?;
        positive_int_at(t, "vocab_size", sat, align_core::text::tokenizer_train::MIN_VOCAB_SIZE as i64)?
            .ok_or_else(|| anyhow!("{sat}.vocab_size: missing (the target vocabulary size, e.g. 2048)"))?;
        positive_int_at(t, "min_frequency", sat, 1)?;
        return Ok(spec);
    }
    let desc = string_at(t, "config", sat)?
        .ok_or_else(|| anyhow!("{sat}.config: missing (a model description TOML, as for align init --config)"))?;
    let desc = PathBuf::from(desc);
    let text = std::fs::read_to_string(&desc).map_err(|_| anyhow!("{sat}.config: {} not found", desc.display()))?;
    toml::from_str::<toml::Table>(&text)
        .map_err(|e| anyhow!("{sat}.config: {}: {}", desc.display(), e.to_string().trim()))?;
    spec.description = Some(desc);
    if let Some(v) = string_at(t, "tokenizer", sat)? {
        spec.tokenizer = Some(tokenizer_source(&v, earlier, &format!("{sat}.tokenizer"))?);
    }
    Ok(spec)
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
        let tokenizer_value = string_at(&defaults, "tokenizer", &dat)?;
        let base_model = string_at(&defaults, "model", &dat)?;
        if init.is_some() && base_model.is_some() {
            bail!("{at}defaults: give at most one of 'model' (a model folder) or 'init' (a model description for align init, with 'tokenizer'); or start from an init stage");
        }
        if init.is_some() && tokenizer_value.is_none() {
            bail!("{at}defaults.tokenizer: required with defaults.init");
        }
        if let Some(p) = init.as_ref().filter(|p| !p.exists()) {
            bail!("{at}defaults.init: {} not found", p.display());
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
            let kind_name = string_at(t, "kind", &sat)?.ok_or_else(|| anyhow!("{sat}.kind: missing"))?;
            let kind = StageKind::parse(&kind_name).ok_or_else(|| {
                anyhow!("{sat}.kind: unknown kind '{kind_name}' (expected one of {})", StageKind::list(&StageKind::ALL))
            })?;
            if kind == StageKind::Tokenizer || kind == StageKind::Init {
                stages.push(made_stage_spec(t, i, name, kind, &sat, &stages)?);
                continue;
            }
            let refer = |key: &str| -> Result<Option<String>> {
                let Some(target) = string_at(t, key, &sat)? else { return Ok(None) };
                if let Some(earlier) = stages.iter().find(|s| s.name == target) {
                    if earlier.kind == StageKind::Tokenizer {
                        bail!("{sat}.{key}: stage '{target}' makes a tokenizer, not a model (name an init or training stage; a tokenizer stage is used through defaults.tokenizer or an init stage's tokenizer)");
                    }
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
            if kind == StageKind::Ppo && reward_model.is_none() && !external_rm {
                bail!("{sat}.reward_model: a ppo stage needs a reward model (the name of an earlier reward stage, or a folder as ppo.reward_model)");
            }
            if kind == StageKind::Ppo && reward_model.is_some() && external_rm {
                bail!("{sat}.ppo.reward_model: give the reward model once (stage reward_model = STAGE, or ppo.reward_model = FOLDER)");
            }
            if let Some(rm) = &reward_model {
                if stages.iter().any(|s| &s.name == rm && s.kind != StageKind::Reward) {
                    bail!("{sat}.reward_model: stage '{rm}' is not a reward stage");
                }
            }
            let eval = string_at(t, "eval", &sat)?;
            if kind == StageKind::Eval && !matches!(eval.as_deref(), Some("perplexity") | Some("answers") | Some("reward")) {
                bail!("{sat}.eval: expected \"perplexity\", \"answers\" or \"reward\", found {:?}", eval);
            }
            if eval.as_deref() == Some("reward") {
                if let Some(f) = &from {
                    if stages.iter().any(|s| &s.name == f && s.kind != StageKind::Reward) {
                        bail!("{sat}.from: a reward evaluation scores with a reward model; stage '{f}' is not a reward stage");
                    }
                }
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
            if kind == StageKind::Dpo || kind == StageKind::Reward {
                read_preference(&data, &DataOptions::default())
                    .map_err(|e| anyhow!("{sat}.data: a {kind} stage needs preference data: {e}"))?;
            }
            if kind == StageKind::Ppo {
                read_prompts(&data, &DataOptions::default())
                    .map_err(|e| anyhow!("{sat}.data: a ppo stage needs prompt data: {e}"))?;
            }
            if kind == StageKind::Eval && eval.as_deref() == Some("perplexity") {
                for f in expand_data_paths(&data)? {
                    read_text_records(&f).map_err(|e| anyhow!("{sat}.data: {e}"))?;
                }
            }
            if kind == StageKind::Eval && eval.as_deref() == Some("reward") {
                read_preference(&data, &DataOptions::default())
                    .map_err(|e| anyhow!("{sat}.data: a reward evaluation needs preference data: {e}"))?;
            }
            if kind == StageKind::Eval && eval.as_deref() == Some("answers") {
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
                description: None,
                tokenizer: None,
                table,
            });
        }
        let tokenizer = match &tokenizer_value {
            Some(v) => Some(tokenizer_source(v, &stages, &format!("{at}defaults.tokenizer"))?),
            None => None,
        };
        if init.is_some() && matches!(tokenizer, Some(TokenizerSource::Stage(_))) {
            bail!("{at}defaults.init: needs defaults.tokenizer to be a folder; to use a tokenizer stage, start from an init stage (kind = \"init\", from = … in the stages after it) instead of defaults.init");
        }
        if init.is_some() && stages.iter().any(|s| s.name == "init") {
            bail!("{at}defaults.init: its model is written to RUN_DIR/init, which is also stage 'init''s folder; drop defaults.init (the init stage replaces it) or rename the stage");
        }
        let tok_stage_index = |name: &str| stages.iter().find(|s| s.name == name).map(|s| s.index);
        for s in &stages {
            let sat = format!("{at}stage[{}]", s.index);
            if s.kind == StageKind::Init && s.tokenizer.is_none() {
                match &tokenizer {
                    None => bail!("{sat}.tokenizer: missing (name an earlier tokenizer stage or a tokenizer folder, or set defaults.tokenizer)"),
                    Some(TokenizerSource::Stage(t)) if tok_stage_index(t).is_some_and(|ti| ti > s.index) => {
                        bail!("{at}defaults.tokenizer: stage '{t}' comes after init stage '{}', which needs it", s.name)
                    }
                    _ => {}
                }
            }
            let starts_from_base = !s.makes_from_files() && s.from.is_none();
            if starts_from_base && base_model.is_none() && init.is_none() {
                bail!("{sat}.from: missing — the pipeline has no defaults.model or defaults.init, so a {} stage starts from an earlier stage (e.g. an init stage)", s.kind);
            }
        }
        let p = Pipeline { name, run_dir, file: file.to_path_buf(), init, tokenizer, base_model, stages };
        // every training stage's config and own section must parse (unknown keys, bad values)
        // before anything runs
        for s in p.stages.iter().filter(|s| !s.makes_from_files()) {
            if s.kind != StageKind::Eval {
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
        LoadedConfig::from_table(t, &self.file, &[], s.kind.as_str())
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
    std::fs::rename(&tmp, dir.join(STAGE_RECORD))?;
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
        p.run_dir.join(PIPELINE_RECORD),
        serde_json::to_string_pretty(&json!({"name": p.name, "stages": names, "file": p.file.display().to_string()}))?
            + "\n",
    )?;
    // the starting model: a given folder, one `align init` makes from a description, or none
    // (then every training stage starts from an earlier stage, e.g. an init stage)
    let base = match (&p.base_model, &p.init, &p.tokenizer) {
        (Some(m), _, _) => {
            let dir = align_core::hf::checkpoint::resolve_model_dir(m)?;
            Some(Produced { hash: content_hash(&dir)?, model: dir, adapter: None })
        }
        (None, Some(init), Some(TokenizerSource::Folder(tok))) => Some(init_model(p, init, tok)?),
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
                Some(f) => produced.get(f).cloned().ok_or_else(|| {
                    anyhow!("stage '{}' needs '{f}', which has not produced a model (run it first)", s.name)
                })?,
                None => base.clone().ok_or_else(|| anyhow!("stage '{}': no starting model (set from = …)", s.name))?,
            };
            if !selected {
                // an unselected stage still passes on what it produced earlier
                if let Some(prev) = previous.filter(|r| r.status == StageStatus::Done) {
                    if let Some(out) = stage_output(p, s, Some(&trained_from(s, input)?), &prev) {
                        produced.insert(s.name.clone(), out);
                    }
                }
                outcomes.push((s.name.clone(), StageOutcome::NotSelected));
                continue;
            }
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

        let up_to_date =
            !opts.restart && previous.as_ref().is_some_and(|r| r.status == StageStatus::Done && r.input_hash == input_hash);
        if up_to_date {
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
        let resume =
            !opts.restart && previous.as_ref().is_some_and(|r| r.input_hash == input_hash && r.status != StageStatus::Done);
        let reason = match (&previous, &upstream_reran) {
            (_, Some(u)) => format!("upstream stage '{u}' re-ran"),
            (Some(r), _) if r.input_hash != input_hash => "its config or inputs changed".to_string(),
            (Some(r), _) if r.status != StageStatus::Done => format!("resuming an interrupted run (was {})", r.status),
            _ => "first run".to_string(),
        };
        tracing::info!("stage {} ({}): running — {reason}", s.name, s.kind);
        let mut rec = StageRecord {
            name: s.name.clone(),
            kind: s.kind,
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
        write_record(&dir, &rec)?;
        mark_downstream_stale(p, s)?;
        let started = Instant::now();
        let result = run_stage(p, s, &plan, !resume);
        rec.duration_seconds = Some(started.elapsed().as_secs_f64());
        rec.finished_at = Some(now());
        match result {
            Ok((summary, eval)) => {
                rec.status = StageStatus::Done;
                rec.summary = summary;
                rec.eval = eval;
                let out = stage_output(p, s, plan.input.as_ref(), &rec);
                rec.output_hash = out.as_ref().map(|o| o.hash.clone());
                write_record(&dir, &rec)?;
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
                write_record(&dir, &rec)?;
                return Err(e.context(format!("stage '{}' ({}) failed", s.name, s.kind)));
            }
        }
    }
    Ok(outcomes)
}

/// What a stage runs on and what decides whether it is up to date.
struct StagePlan {
    /// The model it trains or evaluates (none for tokenizer and init stages).
    input: Option<Produced>,
    cfg: Option<LoadedConfig>,
    /// Init stages: the tokenizer folder the model gets.
    tokenizer_dir: Option<PathBuf>,
    config_json: Value,
    config_hash: String,
    inputs: Vec<Value>,
    data: Vec<Value>,
    tokenizer_hash: Option<String>,
}

/// Content hashes of the stage's `data` files.
fn data_hashes(s: &StageSpec) -> Result<Vec<Value>> {
    let files = s
        .table
        .get("data")
        .and_then(|d| d.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut data = Vec::new();
    if files.is_empty() {
        return Ok(data); // an init stage reads no data files
    }
    for f in expand_data_paths(&files)? {
        data.push(json!({"path": f.display().to_string(), "hash": content_hash(&f)?}));
    }
    Ok(data)
}

/// A defaults.tokenizer stage's output becomes the tokenizer every trained model must share.
fn note_tokenizer(p: &Pipeline, s: &StageSpec, out: &Produced, pipeline_tokenizer: &mut Option<String>) -> Result<()> {
    if p.tokenizer == Some(TokenizerSource::Stage(s.name.clone())) {
        *pipeline_tokenizer = Some(tokenizer_hash(&out.model)?);
    }
    Ok(())
}

/// The plan of a tokenizer stage (its config: vocab_size, min_frequency; its data) or an init
/// stage (its inputs: the model description and the tokenizer).
fn plan_made_stage(p: &Pipeline, s: &StageSpec, produced: &BTreeMap<String, Produced>) -> Result<StagePlan> {
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
fn plan_model_stage(
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
        let r = if reference.adapter.is_some() { merged(&reference)? } else { reference };
        set_path(
            &mut spec.table,
            &[s.kind.to_string(), "reference".to_string()],
            toml::Value::String(r.model.display().to_string()),
        )?;
        extra_inputs.push(json!({"role": "reference", "path": r.model.display().to_string(), "hash": r.hash}));
    }
    if let Some(rm_stage) = &s.reward_model {
        let rm = produced.get(rm_stage).cloned().ok_or_else(|| {
            anyhow!("stage '{}' needs '{rm_stage}' as its reward model, which has not produced a model", s.name)
        })?;
        let rm = if rm.adapter.is_some() { merged(&rm)? } else { rm };
        set_path(
            &mut spec.table,
            &[s.kind.to_string(), "reward_model".to_string()],
            toml::Value::String(rm.model.display().to_string()),
        )?;
        extra_inputs.push(json!({"role": "reward_model", "path": rm.model.display().to_string(), "hash": rm.hash}));
    }
    let cfg =
        if s.kind == StageKind::Eval { None } else { Some(p.stage_config(&spec, &input.model, input.adapter.as_deref())?) };
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
fn trained_from(s: &StageSpec, input: Produced) -> Result<Produced> {
    if s.kind == StageKind::Reward && input.adapter.is_some() {
        merged(&input)
    } else {
        Ok(input)
    }
}

/// What a finished stage passes to the stages after it: its `final/` folder (a LoRA stage passes
/// its base model plus the adapter).
fn stage_output(p: &Pipeline, s: &StageSpec, input: Option<&Produced>, rec: &StageRecord) -> Option<Produced> {
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

fn mark_downstream_stale(p: &Pipeline, s: &StageSpec) -> Result<()> {
    for later in p.stages.iter().filter(|l| l.index > s.index) {
        let path = p.stage_dir(later).join(STAGE_RECORD);
        if let Some(mut r) = read_record(&path) {
            if r.status == StageStatus::Done {
                r.status = StageStatus::Stale;
                r.stale_reason = Some(format!("upstream stage '{}' is re-running", s.name));
                write_record(&p.stage_dir(later), &r)?;
            }
        }
    }
    Ok(())
}

/// Runs one training stage of `kind` (the registry `align train KIND` uses too).
pub fn train_stage(kind: StageKind, cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    match kind {
        StageKind::Pretrain => align_pretrain::run(cfg, restart, stop_after),
        StageKind::Sft => align_sft::run(cfg, restart, stop_after),
        StageKind::Reward => align_reward::run(cfg, restart, stop_after),
        StageKind::Dpo => align_rlhf::run_dpo(cfg, restart, stop_after),
        StageKind::Ppo => align_rlhf::run_ppo(cfg, restart, stop_after),
        StageKind::Tokenizer | StageKind::Init | StageKind::Eval => {
            bail!("{kind} is not a training stage (expected one of {})", StageKind::list(&StageKind::training_kinds()))
        }
    }
}

fn run_stage(
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
fn run_tokenizer_stage(p: &Pipeline, s: &StageSpec) -> Result<Value> {
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
    align_core::hf::checkpoint::write_folder(&out, |tmp| {
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
fn run_init_stage(p: &Pipeline, s: &StageSpec, plan: &StagePlan) -> Result<Value> {
    let desc = s.description.as_ref().ok_or_else(|| anyhow!("stage '{}': no model description", s.name))?;
    let tok = plan.tokenizer_dir.as_ref().ok_or_else(|| anyhow!("stage '{}': no tokenizer", s.name))?;
    let out = p.stage_dir(s).join("final");
    let mut made = None;
    align_core::hf::checkpoint::write_folder(&out, |tmp| {
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

fn run_eval(s: &StageSpec, input: &Produced) -> Result<Value> {
    use align_core::infer::logprobs::corpus_perplexity;
    let device = align_core::model::device::parse_device(
        s.table.get("train").and_then(|t| t.get("device")).and_then(|d| d.as_str()).unwrap_or("auto"),
    )?;
    let dtype = s.table.get("train").and_then(|t| t.get("dtype")).and_then(|d| d.as_str());
    let kind = align_core::model::device::parse_dtype(dtype, device)?;
    if s.eval.as_deref() == Some("reward") {
        return run_reward_eval(s, input, device, kind);
    }
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

/// Pairwise accuracy of a reward model on preference pairs, overall and on length-matched pairs
/// (answers within 10% in tokens), as `align eval reward` reports it.
fn run_reward_eval(s: &StageSpec, input: &Produced, device: tch::Device, kind: tch::Kind) -> Result<Value> {
    use align_core::data::{LengthBudget, LengthPolicy};
    let (rm, tok) = ModelSpec::at(&input.model, input.adapter.as_deref(), device, kind).scalar_model()?;
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
    let pairs = read_preference(&files, &DataOptions::default())?.records;
    let budget = LengthBudget::new(int("max_length", 1024), LengthPolicy::Truncate);
    let (encoded, counts) =
        align_core::train::preference_batch::encode_pairs(&tok, &pairs.iter().collect::<Vec<_>>(), budget)?;
    if encoded.is_empty() {
        bail!("stage '{}': no pair is left after truncation to train.max_length", s.name);
    }
    let st = align_reward::pairwise_stats(&rm.rm, &encoded, int("batch_size", 8))?;
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
