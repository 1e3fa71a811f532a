//! Data preparation before training (`align data dedup | clean | mix | split | convert | stats`):
//! the records of data files read as a stage reads them, each kept with its raw line (so the
//! tools write surviving records byte for byte), its text content and its number of turns; the
//! pure parts (text normalisation, MinHash + LSH, the language detector, mix counts, the
//! three-way split) live in the modules below. Documented in `docs/data-prep.md`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::Value;

use super::reader::{read_file, DataRecord, ReadMode};
use super::report::MeasuredRecord;
use super::source::{expand_data_paths, lines_of, raw_records, FileLayout, RawContent};
use super::unpaired::UnpairedRecord;
use super::{Conversation, DataFormat, DataKind, DataOptions, Document, Origin, PreferencePair, PromptRecord};
use crate::text::chat::ChatMessage;
use crate::text::tokenizer::ModelTokenizer;

pub mod clean;
pub mod convert;
pub mod dedup;
pub mod lang;
pub mod minhash;
pub mod mix;
pub mod normalize;
pub mod stats;

/// One record of a data file as the preparation tools handle it.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepRecord {
    pub origin: Origin,
    /// The record as written: its `.jsonl` or `.txt` line byte for byte (without the line
    /// ending); a `.json` array item as compact JSON.
    pub raw: String,
    /// The JSON object of a `.jsonl` / `.json` record (`None` for `.txt` lines).
    pub value: Option<Value>,
    /// The text the tools compare and measure ([`RecordContent::content`]).
    pub text: String,
    /// User and assistant messages (the system prompt not counted; 0 for pretraining text).
    pub turns: usize,
    /// Token length as the stage sees it, when a tokenizer was given.
    pub tokens: Option<usize>,
}

/// The records of one file.
#[derive(Debug, Clone)]
pub struct PrepFile {
    pub path: PathBuf,
    pub format: Option<DataFormat>,
    pub records: Vec<PrepRecord>,
}

impl PrepFile {
    /// True for a `.txt` file (its records are plain text lines).
    pub fn is_text(&self) -> bool {
        self.path.extension().and_then(|e| e.to_str()) == Some("txt")
    }
}

/// The text content of a record: what dedup compares, what clean measures and what the language
/// detector reads.
pub(crate) trait RecordContent: DataRecord + MeasuredRecord {
    /// All text of the record joined by newlines: a document's text; a conversation's system
    /// prompt and every message; a pair's prompt, chosen and rejected answers; a prompt's
    /// messages and reference answer; an unpaired example's prompt and completion.
    fn content(&self) -> String;
    /// User and assistant messages (the system prompt not counted).
    fn turns(&self) -> usize;
}

fn joined<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    parts.into_iter().filter(|p| !p.is_empty()).collect::<Vec<_>>().join("\n")
}

fn non_system(messages: &[ChatMessage]) -> usize {
    messages.iter().filter(|m| m.role != "system").count()
}

impl RecordContent for Document {
    fn content(&self) -> String {
        self.text.clone()
    }
    fn turns(&self) -> usize {
        0
    }
}

impl RecordContent for Conversation {
    fn content(&self) -> String {
        joined(self.system.as_deref().into_iter().chain(self.messages.iter().map(|m| m.content.as_str())))
    }
    fn turns(&self) -> usize {
        non_system(&self.messages)
    }
}

impl RecordContent for PreferencePair {
    fn content(&self) -> String {
        joined(self.prompt.iter().map(|m| m.content.as_str()).chain([self.chosen.as_str(), self.rejected.as_str()]))
    }
    fn turns(&self) -> usize {
        non_system(&self.prompt) + 1
    }
}

impl RecordContent for PromptRecord {
    fn content(&self) -> String {
        joined(self.messages.iter().map(|m| m.content.as_str()).chain(self.reference.as_deref()))
    }
    fn turns(&self) -> usize {
        non_system(&self.messages)
    }
}

impl RecordContent for UnpairedRecord {
    fn content(&self) -> String {
        match self {
            UnpairedRecord::One(e) => {
                joined(e.prompt.iter().map(|m| m.content.as_str()).chain([e.completion.as_str()]))
            }
            UnpairedRecord::Pair(p) => p.content(),
        }
    }
    fn turns(&self) -> usize {
        match self {
            UnpairedRecord::One(e) => non_system(&e.prompt) + 1,
            UnpairedRecord::Pair(p) => p.turns(),
        }
    }
}

/// How the preparation tools read: strictly (the first invalid record is an error naming its
/// file:line and field) and keeping identical preference pairs (a tool never drops a record
/// without saying so).
pub fn prep_options() -> DataOptions {
    DataOptions { keep_identical_pairs: true, ..DataOptions::default() }
}

/// The raw records of a file by line (`.jsonl` / `.txt`) or array item (`.json`).
fn raw_texts(path: &Path, layout: FileLayout) -> Result<Vec<(usize, String)>> {
    match layout {
        FileLayout::JsonLines | FileLayout::Text => {
            let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
            let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes).to_vec();
            Ok(lines_of(&bytes).filter_map(|(n, line)| line.ok().map(|l| (n, l.to_string()))).collect())
        }
        FileLayout::JsonArray => {
            let raw = match raw_records(path, layout, super::TextMode::Line)? {
                Ok(raw) => raw,
                Err(problem) => return Err(problem.into_error()),
            };
            Ok(raw
                .into_iter()
                .filter_map(|r| match r.content {
                    RawContent::Json(v) => Some((r.origin.array_item.unwrap_or(r.origin.line), v.to_string())),
                    _ => None,
                })
                .collect())
        }
    }
}

fn read_prep_file<T: RecordContent>(path: &Path, tokenizer: Option<&ModelTokenizer>) -> Result<PrepFile> {
    let layout = FileLayout::of(path)?;
    let (records, report) = read_file::<T>(path, layout, &prep_options(), ReadMode::Load)?;
    let raw: std::collections::HashMap<usize, String> = raw_texts(path, layout)?.into_iter().collect();
    let mut out = Vec::with_capacity(records.len());
    for record in &records {
        let origin = record.origin().clone();
        let key = origin.array_item.unwrap_or(origin.line);
        let Some(raw) = raw.get(&key) else { bail!("{origin}: the record's line cannot be read back") };
        let value = if layout == FileLayout::Text { None } else { Some(serde_json::from_str(raw)?) };
        let tokens = match tokenizer {
            Some(tok) => Some(record.token_length(tok).map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))?),
            None => None,
        };
        out.push(PrepRecord { origin, raw: raw.clone(), value, text: record.content(), turns: record.turns(), tokens });
    }
    Ok(PrepFile { path: path.to_path_buf(), format: report.format, records: out })
}

/// Reads data files (paths, folders or globs) of `kind` for the preparation tools; with a
/// tokenizer each record's token length is measured as `align data check` measures it.
pub fn read_prep_files<P: AsRef<Path>>(
    kind: DataKind,
    paths: &[P],
    tokenizer: Option<&ModelTokenizer>,
) -> Result<Vec<PrepFile>> {
    if let Some(tok) = tokenizer {
        if kind != DataKind::Pretrain {
            tok.chat_template()?;
        }
    }
    expand_data_paths(paths)?
        .iter()
        .map(|file| match kind {
            DataKind::Pretrain => read_prep_file::<Document>(file, tokenizer),
            DataKind::Sft => read_prep_file::<Conversation>(file, tokenizer),
            DataKind::Preference => read_prep_file::<PreferencePair>(file, tokenizer),
            DataKind::Prompt => read_prep_file::<PromptRecord>(file, tokenizer),
            DataKind::Unpaired => read_prep_file::<UnpairedRecord>(file, tokenizer),
        })
        .collect()
}

/// The text content and turns of a JSON record of `kind` in `format` (after clean changed it).
pub(crate) fn content_of(
    kind: DataKind,
    format: DataFormat,
    obj: &serde_json::Map<String, Value>,
    origin: &Origin,
) -> std::result::Result<(String, usize), String> {
    fn parsed<T: RecordContent>(
        format: DataFormat,
        obj: &serde_json::Map<String, Value>,
        origin: &Origin,
    ) -> std::result::Result<(String, usize), String> {
        T::parse(format, obj, origin.clone()).map(|r| (r.content(), r.turns())).map_err(|e| e.to_string())
    }
    match kind {
        DataKind::Pretrain => parsed::<Document>(format, obj, origin),
        DataKind::Sft => parsed::<Conversation>(format, obj, origin),
        DataKind::Preference => parsed::<PreferencePair>(format, obj, origin),
        DataKind::Prompt => parsed::<PromptRecord>(format, obj, origin),
        DataKind::Unpaired => parsed::<UnpairedRecord>(format, obj, origin),
    }
}

/// Writes lines (records' raw lines, JSON records) to a file, one per line, with
/// [`write_file_atomic`](crate::hf::folder::write_file_atomic): the old content or the new one,
/// never a mix. Returns the number of lines.
pub fn write_lines<'a>(path: &Path, lines: impl IntoIterator<Item = &'a str>) -> Result<usize> {
    let mut text = String::new();
    let mut n = 0;
    for line in lines {
        text.push_str(line);
        text.push('\n');
        n += 1;
    }
    crate::hf::folder::write_file_atomic(path, text.as_bytes())?;
    Ok(n)
}

/// The extension an output of these files gets: `txt` when every file is plain text, `jsonl`
/// when none is; a mix of both is an error (the lines cannot share one file).
pub fn output_extension(files: &[PrepFile]) -> Result<&'static str> {
    let text = files.iter().filter(|f| f.is_text()).count();
    match text {
        0 => Ok("jsonl"),
        n if n == files.len() => Ok("txt"),
        _ => bail!("the inputs mix .txt and JSON files; their records cannot be written to one file"),
    }
}

/// Checks that an output file's extension matches its records (`.jsonl` for JSON records, `.txt`
/// for text lines).
pub fn check_output_extension(path: &Path, files: &[PrepFile]) -> Result<()> {
    let want = output_extension(files)?;
    if path.extension().and_then(|e| e.to_str()) != Some(want) {
        bail!("{}: the output holds one record per line; expected a .{want} file", path.display());
    }
    Ok(())
}
