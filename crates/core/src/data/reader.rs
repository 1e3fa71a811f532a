//! Reading the records of data files into documents, conversations, preference pairs or
//! prompts: per-file format detection, invalid-record handling and the per-file reports.
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use super::fields::{FieldError, FieldResult};
use super::prep::dedup::{find_duplicates, DedupConfig, DropReason, KeptRecord};
use super::prep::mix::{describe_mix, mix_groups, mix_records, MixSource};
use super::prep::RecordContent;
use super::source::{expand_data_paths, raw_records, FileLayout, RawContent};
use super::DedupMode;
use super::{
    kind_name, preference, pretrain, prompt, ranked, sft, unpaired, Conversation, DataFormat, DataKind, DataOptions,
    DataReport, Document, Origin, PreferencePair, PromptRecord, TextMode, UnpairedExample,
};
use unpaired::UnpairedRecord;

/// The records of all files, in file order, and one report per file.
#[derive(Debug, Clone)]
pub struct LoadedData<T> {
    pub records: Vec<T>,
    pub reports: Vec<DataReport>,
}

/// A record type of one data kind.
pub(crate) trait DataRecord: Sized {
    const KIND: DataKind;
    fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Self>;
    /// The records of one JSON record: one, or several for a ranked preference list.
    fn parse_many(
        format: DataFormat,
        obj: &Map<String, Value>,
        origin: Origin,
        _options: &DataOptions,
    ) -> FieldResult<Vec<Self>> {
        Self::parse(format, obj, origin).map(|r| vec![r])
    }
    fn origin(&self) -> &Origin;
    /// A `.txt` document (only pretraining reads `.txt`).
    fn from_text(_text: String, _origin: Origin) -> Option<Self> {
        None
    }
    fn is_identical_pair(&self) -> bool {
        false
    }
}

impl DataRecord for Document {
    const KIND: DataKind = DataKind::Pretrain;
    fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Self> {
        pretrain::parse(format, obj, origin)
    }
    fn origin(&self) -> &Origin {
        &self.origin
    }
    fn from_text(text: String, origin: Origin) -> Option<Self> {
        Some(Document { text, origin })
    }
}

impl DataRecord for Conversation {
    const KIND: DataKind = DataKind::Sft;
    fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Self> {
        sft::parse(format, obj, origin)
    }
    fn origin(&self) -> &Origin {
        &self.origin
    }
}

impl DataRecord for PreferencePair {
    const KIND: DataKind = DataKind::Preference;
    fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Self> {
        preference::parse(format, obj, origin)
    }
    fn parse_many(
        format: DataFormat,
        obj: &Map<String, Value>,
        origin: Origin,
        options: &DataOptions,
    ) -> FieldResult<Vec<Self>> {
        if format.is_ranked() {
            ranked::parse(format, obj, origin, options.ranked_pairs)
        } else {
            preference::parse(format, obj, origin).map(|p| vec![p])
        }
    }
    fn origin(&self) -> &Origin {
        &self.origin
    }
    fn is_identical_pair(&self) -> bool {
        self.is_identical()
    }
}

impl DataRecord for PromptRecord {
    const KIND: DataKind = DataKind::Prompt;
    fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Self> {
        prompt::parse(format, obj, origin)
    }
    fn origin(&self) -> &Origin {
        &self.origin
    }
}

impl DataRecord for UnpairedRecord {
    const KIND: DataKind = DataKind::Unpaired;
    fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Self> {
        unpaired::parse(format, obj, origin)
    }
    fn origin(&self) -> &Origin {
        UnpairedRecord::origin(self)
    }
    fn is_identical_pair(&self) -> bool {
        UnpairedRecord::is_identical_pair(self)
    }
}

/// Loading for training (options decide what an invalid record does) or checking (every
/// problem is recorded in the report, nothing is an error but an unreadable file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    Load,
    Check,
}

fn keys_of(obj: &Map<String, Value>) -> String {
    if obj.is_empty() {
        return "none".to_string();
    }
    let mut keys: Vec<String> = obj.keys().take(8).map(|k| format!("'{k}'")).collect();
    if obj.len() > 8 {
        keys.push("…".to_string());
    }
    keys.join(", ")
}

/// Reads one file as records of `T`.
pub(crate) fn read_file<T: DataRecord>(
    path: &Path,
    layout: FileLayout,
    options: &DataOptions,
    mode: ReadMode,
) -> Result<(Vec<T>, DataReport)> {
    let kind = T::KIND;
    let mut report = DataReport::new(path, kind);
    if layout == FileLayout::Text && kind != DataKind::Pretrain {
        bail!("{}: .txt files hold pretraining text only; {kind} data must be a .jsonl or .json file", path.display());
    }
    let raw = match raw_records(path, layout, options.text_mode)? {
        Ok(raw) => raw,
        Err(problem) if mode == ReadMode::Check => {
            report.add_invalid(problem.origin, problem.message, options.max_invalid_shown);
            return Ok((Vec::new(), report));
        }
        Err(problem) => return Err(problem.into_error()),
    };
    if layout == FileLayout::Text {
        report.format = Some(match options.text_mode {
            TextMode::Line => DataFormat::TextLines,
            TextMode::File => DataFormat::TextFile,
        });
    }
    let mut detected: Option<(DataFormat, usize)> = None;
    let mut records = Vec::with_capacity(raw.len());
    for rec in raw {
        let origin = rec.origin;
        let parsed: std::result::Result<Vec<T>, String> = match rec.content {
            RawContent::Text(text) => T::from_text(text, origin.clone())
                .map(|r| vec![r])
                .ok_or_else(|| format!("{kind} data cannot be read from plain text")),
            RawContent::Invalid(message) => Err(message),
            RawContent::Json(Value::Object(obj)) => match detected {
                Some((format, from_line)) => T::parse_many(format, &obj, origin.clone(), options)
                    .map_err(|e| explain_mismatch(e, DataFormat::detect(kind, &obj), format, from_line, origin.line)),
                None => match DataFormat::detect(kind, &obj) {
                    Some(format) => {
                        let parsed = T::parse_many(format, &obj, origin.clone(), options).map_err(|e| e.to_string());
                        if parsed.is_ok() {
                            detected = Some((format, origin.line));
                            report.format = Some(format);
                        }
                        parsed
                    }
                    None => Err(format!(
                        "no {kind} format matches the record's keys ({}); expected {}",
                        keys_of(&obj),
                        DataFormat::expected_keys(kind)
                    )),
                },
            },
            RawContent::Json(other) => Err(format!("expected a JSON object, found {}", kind_name(&other))),
        };
        match parsed {
            Ok(items) => {
                if detected.is_some_and(|(f, _)| f.is_ranked()) {
                    report.ranked_lists += 1;
                }
                for record in items {
                    if record.is_identical_pair() {
                        report.identical_pairs += 1;
                        if !options.keep_identical_pairs {
                            report.skipped += 1;
                            continue;
                        }
                    }
                    records.push(record);
                }
            }
            Err(message) => {
                if mode == ReadMode::Load && !options.skip_invalid {
                    bail!("{origin}: {message}");
                }
                if mode == ReadMode::Load {
                    report.skipped += 1;
                }
                report.add_invalid(origin, message, options.max_invalid_shown);
            }
        }
    }
    report.records = records.len();
    Ok((records, report))
}

/// A record that does not fit the file's format says which format the file has and where it
/// was detected, and what the record itself looks like.
fn explain_mismatch(
    error: FieldError,
    looks_like: Option<DataFormat>,
    file_format: DataFormat,
    from_line: usize,
    line: usize,
) -> String {
    match looks_like {
        Some(f) if f == file_format => error.to_string(),
        _ if from_line == line => error.to_string(),
        Some(f) => format!(
            "{error} (this record looks like {f}; the file's format is {file_format}, detected at line {from_line})"
        ),
        None => format!("{error} (the file's format is {file_format}, detected at line {from_line})"),
    }
}

/// Reads every file of `paths` (files, folders or glob patterns).
fn read_all<T: RecordContent + Clone, P: AsRef<Path>>(paths: &[P], options: &DataOptions) -> Result<LoadedData<T>> {
    options.validate()?;
    let files = expand_data_paths(paths)?;
    let mut per_file = Vec::with_capacity(files.len());
    let mut reports = Vec::with_capacity(files.len());
    for file in &files {
        let (r, report) = read_file::<T>(file, FileLayout::of(file)?, options, ReadMode::Load)?;
        per_file.push(r);
        reports.push(report);
    }
    if options.dedup != DedupMode::None {
        per_file = deduplicated(per_file, options)?;
    }
    let records = if options.mix.is_empty() { per_file.concat() } else { mixed(&files, per_file, options)? };
    if records.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let invalid: usize = reports.iter().map(|r| r.invalid).sum();
        match reports.iter().find_map(|r| r.invalid_records.first()) {
            Some(first) => {
                bail!("{}: no valid {} records ({invalid} invalid; the first: {first})", names.join(", "), T::KIND)
            }
            None => bail!("{}: no {} records", names.join(", "), T::KIND),
        }
    }
    Ok(LoadedData { records, reports })
}

/// The records of a read without the duplicates `options.dedup` names (the first of each group is
/// kept, as `align data dedup` keeps it); logs how many went and each with its file:line.
fn deduplicated<T: RecordContent>(per_file: Vec<Vec<T>>, options: &DataOptions) -> Result<Vec<Vec<T>>> {
    let texts: Vec<String> = per_file.iter().flatten().map(RecordContent::content).collect();
    let origins: Vec<&Origin> = per_file.iter().flatten().map(DataRecord::origin).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let config = DedupConfig { near_threshold: options.dedup_threshold, ..DedupConfig::default() };
    let found = find_duplicates(&refs, &[], &config)?;
    let mut drop = vec![false; texts.len()];
    let (mut exact, mut near) = (0, 0);
    for d in &found {
        if options.dedup == DedupMode::Exact && d.reason != DropReason::Exact {
            continue;
        }
        drop[d.record] = true;
        let of = match d.of {
            KeptRecord::Train(i) | KeptRecord::Eval(i) => origins[i].to_string(),
        };
        if d.reason == DropReason::Exact {
            exact += 1;
        } else {
            near += 1;
        }
        if exact + near <= options.max_invalid_shown {
            tracing::info!(
                "data dedup: {} dropped, {} duplicate of {of} (similarity {:.3})",
                origins[d.record],
                if d.reason == DropReason::Exact { "an exact" } else { "a near" },
                d.similarity
            );
        }
    }
    tracing::info!(
        "data dedup ({:?}): {} records, {exact} exact and {near} near duplicates dropped",
        options.dedup,
        texts.len()
    );
    let mut k = 0;
    Ok(per_file
        .into_iter()
        .map(|records| {
            records
                .into_iter()
                .filter(|_| {
                    k += 1;
                    !drop[k - 1]
                })
                .collect()
        })
        .collect())
}

/// The records of a read sampled by `options.mix` (seeded by `options.seed`); logs the
/// realised mix.
fn mixed<T: Clone>(files: &[std::path::PathBuf], per_file: Vec<Vec<T>>, options: &DataOptions) -> Result<Vec<T>> {
    let groups = mix_groups(files, &options.mix)?;
    let mut per_file: Vec<Option<Vec<T>>> = per_file.into_iter().map(Some).collect();
    let sources: Vec<(MixSource, Vec<T>)> = groups
        .into_iter()
        .map(|(name, weight, members)| {
            let records: Vec<T> = members.iter().flat_map(|&i| per_file[i].take().unwrap_or_default()).collect();
            (MixSource { name, weight, available: records.len() }, records)
        })
        .collect();
    let (records, shares) = mix_records(sources, options.mix_total, options.mix_upsample, options.seed)?;
    tracing::info!("data mix (seed {}): {} records: {}", options.seed, records.len(), describe_mix(&shares));
    Ok(records)
}

/// Reads pretraining documents from `.txt` (split by `options.text_mode`) and `{"text"}`
/// `.jsonl` / `.json` files.
pub fn read_pretrain<P: AsRef<Path>>(paths: &[P], options: &DataOptions) -> Result<LoadedData<Document>> {
    read_all(paths, options)
}

/// Reads SFT conversations (ShareGPT, OpenAI messages, Alpaca, prompt/completion).
pub fn read_sft<P: AsRef<Path>>(paths: &[P], options: &DataOptions) -> Result<LoadedData<Conversation>> {
    read_all(paths, options)
}

/// Reads preference pairs (MedicalGPT, LLaMA-Factory, TRL, TRL implicit prompt, Alpaca,
/// question/response). Pairs whose answers are identical are counted in each report and left
/// out unless `options.keep_identical_pairs`.
pub fn read_preference<P: AsRef<Path>>(paths: &[P], options: &DataOptions) -> Result<LoadedData<PreferencePair>> {
    read_all(paths, options)
}

/// Reads rollout prompts (prompt, question/answer, ShareGPT, OpenAI messages, Alpaca).
pub fn read_prompts<P: AsRef<Path>>(paths: &[P], options: &DataOptions) -> Result<LoadedData<PromptRecord>> {
    read_all(paths, options)
}

/// Reads unpaired examples for KTO: TRL's `{"prompt", "completion", "label"}` records, and
/// preference pairs of any format, each split into its chosen answer (desirable) and its
/// rejected one (undesirable), in that order. `label` must be a boolean.
pub fn read_unpaired<P: AsRef<Path>>(paths: &[P], options: &DataOptions) -> Result<LoadedData<UnpairedExample>> {
    let data: LoadedData<UnpairedRecord> = read_all(paths, options)?;
    Ok(LoadedData {
        records: data.records.into_iter().flat_map(UnpairedRecord::into_examples).collect(),
        reports: data.reports,
    })
}

/// The documents of one file, `.jsonl` / `.json` by their `text` field and any other extension
/// as plain text; the first invalid record is an error.
pub(crate) fn read_documents_of_file(path: &Path, text_mode: TextMode) -> Result<Vec<Document>> {
    let layout = FileLayout::of(path).unwrap_or(FileLayout::Text);
    let options = DataOptions { text_mode, ..DataOptions::default() };
    let (documents, _) = read_file::<Document>(path, layout, &options, ReadMode::Load)?;
    Ok(documents)
}
