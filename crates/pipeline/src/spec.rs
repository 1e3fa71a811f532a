//! The pipeline file: parsing, defaults merged into stages, `--set` overrides, and validation of
//! every stage (kinds, references between stages, data formats, each stage's own section)
//! before anything trains; errors name the key path.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use align_core::data::{
    expand_data_paths, read_preference, read_prompts, read_sft, read_text_records, read_unpaired, DataOptions,
};
use align_core::train::config::{parse_override, set_path, LoadedConfig};
use align_runs::StageKind;

/// Keys of a `tokenizer` stage (it trains a byte-level BPE as `align tokenizer train` does).
pub(crate) const TOKENIZER_STAGE_KEYS: &[&str] = &["name", "kind", "data", "vocab_size", "min_frequency"];
/// Keys of an `init` stage (it random-initialises a model as `align init` does).
pub(crate) const INIT_STAGE_KEYS: &[&str] = &["name", "kind", "config", "tokenizer"];
pub(crate) const STAGE_KEYS: &[&str] = &[
    "name",
    "kind",
    "from",
    "reward_model",
    "reference",
    "teacher",
    "eval",
    "allow_tokenizer_mismatch",
    "max_new_tokens",
];
pub(crate) const DEFAULT_ONLY_KEYS: &[&str] = &["init", "tokenizer", "device", "dtype", "seed", "threads"];

fn d_max_new_tokens() -> usize {
    64
}

/// What an `eval` stage reads: its data and data options, the generation budget of an `answers`
/// evaluation, and from `[train]` only the batch/length/device settings. Its own keys are checked
/// as strictly as a training stage's (typed, no unknown key); what it inherits from `[defaults]`
/// may hold training keys it does not use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    pub data: Vec<String>,
    #[serde(default)]
    pub data_options: DataOptions,
    #[serde(default = "d_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub train: EvalTrain,
    /// `[stage.choice]` of an `eval = "choice"` stage.
    pub choice: Option<ChoiceSettings>,
}

/// `[stage.choice]`: the settings of `align eval choice` (the items are the stage's `data`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChoiceSettings {
    /// mmlu, cmmlu, ceval or medqa.
    #[serde(default = "d_template")]
    pub template: String,
    /// Solved examples (the dev split): the first `shots` of each item's subject.
    #[serde(default)]
    pub dev: Vec<String>,
    #[serde(default)]
    pub shots: usize,
    /// Through the model's chat template.
    #[serde(default)]
    pub chat: bool,
    /// loglikelihood, generate or both.
    #[serde(default = "d_scoring")]
    pub scoring: String,
}

fn d_template() -> String {
    "mmlu".into()
}

fn d_scoring() -> String {
    "loglikelihood".into()
}

/// `[train]` of an eval stage.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalTrain {
    pub batch_size: Option<usize>,
    pub max_length: Option<usize>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub threads: Option<i32>,
    pub seed: Option<u64>,
}

impl EvalTrain {
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(8).max(1)
    }
    pub fn max_length(&self) -> usize {
        self.max_length.unwrap_or(1024).max(1)
    }
}

/// The keys an eval stage may set itself (besides the stage keys).
const EVAL_KEYS: &[&str] = &["data", "data_options", "max_new_tokens", "train", "choice"];

/// The settings and files of a multiple-choice evaluation are usable: a known template and
/// scoring, readable items and dev examples, dev files when shots are asked for.
fn check_choice(c: &ChoiceSettings, data: &[String]) -> Result<()> {
    use align_core::eval::choice::{read_choice_files, ChoiceScoring, ChoiceTemplate};
    c.template.parse::<ChoiceTemplate>().context("choice.template")?;
    c.scoring.parse::<ChoiceScoring>().context("choice.scoring")?;
    if c.shots > 0 && c.dev.is_empty() {
        bail!("choice.shots = {}: needs choice.dev files with solved examples", c.shots);
    }
    read_choice_files(&expand_data_paths(data)?).context("data")?;
    if !c.dev.is_empty() {
        read_choice_files(&expand_data_paths(&c.dev)?).context("choice.dev")?;
    }
    Ok(())
}

/// An eval stage's settings: its own keys (`own`) checked strictly, then the effective ones read
/// from `merged` (the defaults with its own keys merged in).
pub(crate) fn eval_settings(own: &toml::Table, merged: &toml::Table, sat: &str) -> Result<EvalSettings> {
    let describe = |e: toml::de::Error| anyhow!("{sat}: {}", e.message().trim());
    // typed and strict: a typo or a wrong type in the stage itself is an error
    let mut mine = own.clone();
    mine.entry("data").or_insert(toml::Value::Array(Vec::new()));
    for key in mine.keys() {
        if !EVAL_KEYS.contains(&key.as_str()) {
            bail!("{sat}.{key}: unknown key for an eval stage (expected {})", EVAL_KEYS.join(", "));
        }
    }
    toml::Value::Table(mine).try_into::<EvalSettings>().map_err(describe)?;
    // what it inherits: only the keys an evaluation uses
    let mut effective = toml::Table::new();
    for key in ["data", "data_options", "max_new_tokens", "choice"] {
        if let Some(v) = merged.get(key) {
            effective.insert(key.to_string(), v.clone());
        }
    }
    if let Some(toml::Value::Table(train)) = merged.get("train") {
        let used: toml::Table = train
            .iter()
            .filter(|(k, _)| ["batch_size", "max_length", "device", "dtype", "threads", "seed"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        effective.insert("train".to_string(), toml::Value::Table(used));
    }
    effective.entry("data").or_insert(toml::Value::Array(Vec::new()));
    let settings: EvalSettings = toml::Value::Table(effective).try_into().map_err(describe)?;
    settings.data_options.validate().map_err(|e| anyhow!("{sat}.data_options: {e}"))?;
    if settings.max_new_tokens == 0 {
        bail!("{sat}.max_new_tokens: expected at least 1");
    }
    Ok(settings)
}

/// One stage as written in the pipeline file, with its position.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub index: usize,
    pub name: String,
    pub kind: StageKind,
    pub from: Option<String>,
    pub reward_model: Option<String>,
    pub reference: Option<String>,
    /// `distill` stages: the earlier stage whose model is the teacher (`distill.teacher`).
    pub teacher: Option<String>,
    /// `eval` stages: which evaluation (`perplexity`).
    pub eval: Option<String>,
    /// `eval` stages: what the evaluation reads.
    pub eval_settings: Option<EvalSettings>,
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
pub(crate) fn tokenizer_source(value: &str, earlier: &[StageSpec], at: &str) -> Result<TokenizerSource> {
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

pub(crate) fn positive_int_at(t: &toml::Table, key: &str, at: &str, min: i64) -> Result<Option<i64>> {
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

pub(crate) fn table_at<'a>(t: &'a toml::Table, key: &str, at: &str) -> Result<Option<&'a toml::Table>> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::Table(x)) => Ok(Some(x)),
        Some(other) => bail!("{at}{key}: expected a table, found {}", other.type_str()),
    }
}

pub(crate) fn string_at(t: &toml::Table, key: &str, at: &str) -> Result<Option<String>> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{at}.{key}: expected a string, found {}", other.type_str()),
    }
}

/// Deep-merges `over` into `base` (tables merge, everything else replaces).
pub(crate) fn merge(base: &mut toml::Table, over: &toml::Table) {
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
pub(crate) fn made_stage_spec(
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
        teacher: None,
        eval: None,
        eval_settings: None,
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
                    // merged, not replaced: [defaults.train] keeps what device/dtype/seed/threads set
                    merge(&mut shared, &toml::Table::from_iter([(k.clone(), v.clone())]));
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
            let teacher = refer("teacher")?;
            let external_teacher = t.get("distill").and_then(|d| d.get("teacher")).is_some();
            if teacher.is_some() && kind != StageKind::Distill {
                bail!("{sat}.teacher: only a distill stage has a teacher");
            }
            if kind == StageKind::Distill && teacher.is_none() && !external_teacher {
                bail!("{sat}.teacher: a distill stage needs a teacher (the name of an earlier stage, or a folder as distill.teacher)");
            }
            if teacher.is_some() && external_teacher {
                bail!(
                    "{sat}.distill.teacher: give the teacher once (stage teacher = STAGE, or distill.teacher = FOLDER)"
                );
            }
            let external_rm = t.get(kind.as_str()).and_then(|p| p.get("reward_model")).is_some();
            if kind == StageKind::Ppo && reward_model.is_none() && !external_rm {
                bail!("{sat}.reward_model: a ppo stage needs a reward model (the name of an earlier reward stage, or a folder as ppo.reward_model)");
            }
            if (kind == StageKind::Ppo || kind.samples_groups()) && reward_model.is_some() && external_rm {
                bail!("{sat}.{kind}.reward_model: give the reward model once (stage reward_model = STAGE, or {kind}.reward_model = FOLDER)");
            }
            if let Some(rm) = &reward_model {
                if stages.iter().any(|s| &s.name == rm && s.kind != StageKind::Reward) {
                    bail!("{sat}.reward_model: stage '{rm}' is not a reward stage");
                }
            }
            let eval = string_at(t, "eval", &sat)?;
            if kind == StageKind::Eval
                && !matches!(eval.as_deref(), Some("perplexity") | Some("answers") | Some("reward") | Some("choice"))
            {
                bail!("{sat}.eval: expected \"perplexity\", \"answers\", \"reward\" or \"choice\", found {:?}", eval);
            }
            if t.contains_key("choice") && eval.as_deref() != Some("choice") {
                bail!("{sat}.choice: only an eval = \"choice\" stage reads it");
            }
            if eval.as_deref() == Some("reward") {
                if let Some(f) = &from {
                    if stages.iter().any(|s| &s.name == f && s.kind != StageKind::Reward) {
                        bail!("{sat}.from: a reward evaluation scores with a reward model; stage '{f}' is not a reward stage");
                    }
                }
            }
            let allow_tokenizer_mismatch = match t.get("allow_tokenizer_mismatch") {
                None => false,
                Some(toml::Value::Boolean(b)) => *b,
                Some(other) => {
                    bail!("{sat}.allow_tokenizer_mismatch: expected true or false, found {}", other.type_str())
                }
            };
            if kind != StageKind::Eval && t.contains_key("max_new_tokens") {
                bail!("{sat}.max_new_tokens: only an eval stage (eval = \"answers\") reads it; a ppo stage sets ppo.max_new_tokens");
            }
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
            if kind == StageKind::Eval {
                if let Some(v) = t.get("max_new_tokens") {
                    own.insert("max_new_tokens".into(), v.clone());
                }
            }
            merge(&mut table, &own);
            let eval_settings = if kind == StageKind::Eval { Some(eval_settings(&own, &table, &sat)?) } else { None };
            // data files must exist, and be of the right kind, read with the stage's own options
            let data: Vec<String> = match table.get("data") {
                None => Vec::new(),
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
            };
            if data.is_empty() {
                bail!("{sat}.data: expected at least one data file");
            }
            expand_data_paths(&data).map_err(|e| anyhow!("{sat}.data: {e}"))?;
            let mut options: DataOptions = match table.get("data_options") {
                None => DataOptions::default(),
                Some(v) => v
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| anyhow!("{sat}.data_options: {}", e.message().trim()))?,
            };
            // a mix samples with the stage's seed, as the stage will
            if let Some(seed) = table.get("train").and_then(|t| t.get("seed")).and_then(toml::Value::as_integer) {
                options.seed = seed as u64;
            }
            options.validate().map_err(|e| anyhow!("{sat}.data_options: {e}"))?;
            if kind == StageKind::Dpo || kind == StageKind::Reward {
                read_preference(&data, &options)
                    .map_err(|e| anyhow!("{sat}.data: a {kind} stage needs preference data: {e}"))?;
            }
            if kind == StageKind::Kto {
                read_unpaired(&data, &options).map_err(|e| {
                    anyhow!("{sat}.data: a kto stage needs unpaired (prompt/completion/label) or preference data: {e}")
                })?;
            }
            if kind == StageKind::Distill {
                read_sft(&data, &options).map_err(|e| anyhow!("{sat}.data: a distill stage needs SFT data: {e}"))?;
            }
            if kind == StageKind::Ppo || kind.samples_groups() {
                read_prompts(&data, &options)
                    .map_err(|e| anyhow!("{sat}.data: a {kind} stage needs prompt data: {e}"))?;
            }
            if kind == StageKind::Eval && eval.as_deref() == Some("perplexity") {
                for f in expand_data_paths(&data)? {
                    read_text_records(&f).map_err(|e| anyhow!("{sat}.data: {e}"))?;
                }
            }
            if kind == StageKind::Eval && eval.as_deref() == Some("reward") {
                read_preference(&data, &options)
                    .map_err(|e| anyhow!("{sat}.data: a reward evaluation needs preference data: {e}"))?;
            }
            if kind == StageKind::Eval && eval.as_deref() == Some("choice") {
                let c = eval_settings.as_ref().and_then(|e| e.choice.clone()).ok_or_else(|| {
                    anyhow!("{sat}.choice: an eval = \"choice\" stage needs a [choice] section (template, dev, shots, chat, scoring)")
                })?;
                check_choice(&c, &data).map_err(|e| anyhow!("{sat}: {e:#}"))?;
            }
            if kind == StageKind::Eval && eval.as_deref() == Some("answers") {
                read_sft(&data, &options)
                    .map_err(|e| anyhow!("{sat}.data: an answers evaluation needs conversations: {e}"))?;
            }
            stages.push(StageSpec {
                index: i,
                name,
                kind,
                from,
                reward_model,
                reference,
                teacher,
                eval,
                eval_settings,
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
                cfg.and_then(|c| check_stage_section(&c, s.reward_model.is_some()))
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
/// keys and bad values are reported before anything trains. `reward_stage`: the stage names an
/// earlier reward stage, whose model is filled in as `<kind>.reward_model` at run time.
pub(crate) fn check_stage_section(cfg: &LoadedConfig, reward_stage: bool) -> Result<()> {
    match cfg.stage_name.as_str() {
        "pretrain" => cfg.stage_section::<align_pretrain::PretrainSection>().map(|_| ()),
        "sft" => cfg.stage_section::<align_sft::SftSection>().map(|_| ()),
        "reward" => cfg.stage_section::<align_reward::RewardSection>().map(|_| ()),
        "dpo" => {
            let d: align_rlhf::DpoSection = cfg.stage_section()?;
            d.params().validate().map_err(|e| anyhow!("[dpo] {e}"))
        }
        "kto" => {
            let k: align_rlhf::KtoSection = cfg.stage_section()?;
            k.params().validate().map_err(|e| anyhow!("[kto] {e}"))
        }
        "distill" => {
            // a teacher named as a stage is filled in at run time
            let mut c = cfg.clone();
            c.stage.entry("teacher").or_insert(toml::Value::String("TEACHER".into()));
            let d: align_rlhf::DistillSection = c.stage_section()?;
            d.validate().map_err(|e| anyhow!("[distill] {e}"))
        }
        "ppo" => {
            // the reward model is filled in at run time from the stage it names
            let mut c = cfg.clone();
            c.stage.entry("reward_model").or_insert(toml::Value::String("REWARD_MODEL".into()));
            let section: align_rlhf::PpoSection = c.stage_section()?;
            section.validate().map_err(|e| anyhow!("[ppo] {e}"))
        }
        "grpo" | "rloo" | "reinforce_pp" => {
            let mut c = cfg.clone();
            if reward_stage {
                c.stage.entry("reward_model").or_insert(toml::Value::String("REWARD_MODEL".into()));
            }
            align_rlhf::grpo::section_of(&c).map(|_| ())
        }
        _ => Ok(()),
    }
}
