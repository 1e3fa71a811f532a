//! Per-file data reports (format, records, invalid records with file:line, identical pairs,
//! token-length percentiles) and the checks behind `align data check`.
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use super::reader::{read_file, DataRecord, ReadMode};
use super::source::{expand_data_paths, FileLayout};
use super::unpaired::UnpairedRecord;
use super::{
    Conversation, DataFormat, DataKind, DataOptions, Document, LengthBudgetCounts, Origin, PreferencePair, PromptRecord,
};
use crate::text::conversation::encode_conversation_with_tools;
use crate::text::tokenizer::ModelTokenizer;

/// One invalid record: where it is and what is wrong (`field 'x': expected …, found …`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvalidRecord {
    #[serde(flatten)]
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for InvalidRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// Token-length statistics of a file's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LengthStats {
    /// Records measured.
    pub count: usize,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
    pub max_length: Option<usize>,
    /// Records longer than `max_length` (0 when there is no `max_length`).
    pub over_max_length: usize,
}

impl LengthStats {
    /// Nearest-rank percentiles of `lengths`; `None` when there are none.
    pub fn from_lengths(lengths: &[usize], max_length: Option<usize>) -> Option<Self> {
        if lengths.is_empty() {
            return None;
        }
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Some(LengthStats {
            count: sorted.len(),
            p50: rank(0.50),
            p95: rank(0.95),
            max: sorted[sorted.len() - 1],
            max_length,
            over_max_length: max_length.map_or(0, |m| sorted.iter().filter(|&&l| l > m).count()),
        })
    }
}

/// What reading one file found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataReport {
    pub path: PathBuf,
    pub kind: DataKind,
    /// The detected format (`None` when the file has no valid record).
    pub format: Option<DataFormat>,
    /// Records read into the data.
    pub records: usize,
    /// Invalid records (all of them are counted; `invalid_records` lists the first few).
    pub invalid: usize,
    pub invalid_records: Vec<InvalidRecord>,
    /// Records left out of the data: invalid records under `skip_invalid`, and identical
    /// preference pairs unless `keep_identical_pairs`.
    pub skipped: usize,
    /// Preference pairs whose chosen and rejected answers are the same text.
    pub identical_pairs: usize,
    /// Ranked preference lists read (each gave several of the `records`, which count pairs).
    pub ranked_lists: usize,
    /// Token lengths (when measured with a tokenizer).
    pub lengths: Option<LengthStats>,
    /// What a stage's length budget did with the records (set by the stage).
    pub length_budget: Option<LengthBudgetCounts>,
}

impl DataReport {
    pub fn new(path: &Path, kind: DataKind) -> Self {
        DataReport {
            path: path.to_path_buf(),
            kind,
            format: None,
            records: 0,
            invalid: 0,
            invalid_records: Vec::new(),
            skipped: 0,
            identical_pairs: 0,
            ranked_lists: 0,
            lengths: None,
            length_budget: None,
        }
    }

    /// Counts an invalid record and lists it while fewer than `max_shown` are listed.
    pub fn add_invalid(&mut self, origin: Origin, message: String, max_shown: usize) {
        self.invalid += 1;
        if self.invalid_records.len() < max_shown {
            self.invalid_records.push(InvalidRecord { origin, message });
        }
    }

    fn format_name(&self) -> &'static str {
        self.format.map_or("-", DataFormat::name)
    }

    fn write_invalid(&self, f: &mut impl fmt::Write, indent: &str) -> fmt::Result {
        for r in &self.invalid_records {
            writeln!(f, "{indent}{r}")?;
        }
        let hidden = self.invalid - self.invalid_records.len();
        if hidden > 0 {
            let s = if hidden == 1 { "" } else { "s" };
            writeln!(f, "{indent}… and {hidden} more invalid record{s} in {}", self.path.display())?;
        }
        Ok(())
    }
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({}, {}): {} records, {} invalid, {} skipped",
            self.path.display(),
            self.kind,
            self.format_name(),
            self.records,
            self.invalid,
            self.skipped
        )?;
        if self.identical_pairs > 0 {
            writeln!(f, "  {} pairs with identical chosen and rejected answers", self.identical_pairs)?;
        }
        if let Some(l) = &self.lengths {
            write!(f, "  tokens: p50 {}, p95 {}, max {}", l.p50, l.p95, l.max)?;
            match l.max_length {
                Some(m) => writeln!(f, "; {} longer than {m}", l.over_max_length)?,
                None => writeln!(f)?,
            }
        }
        if let Some(b) = &self.length_budget {
            writeln!(f, "  {b}")?;
        }
        self.write_invalid(f, "  ")
    }
}

/// The reports as one table (a row per file, a total row when there are several), followed by
/// the invalid records.
pub fn reports_table(reports: &[DataReport]) -> String {
    let with_lengths = reports.iter().any(|r| r.lengths.is_some());
    let max_length = reports.iter().find_map(|r| r.lengths.and_then(|l| l.max_length));
    let with_skipped = reports.iter().any(|r| r.skipped > 0);
    let with_identical = reports.iter().any(|r| matches!(r.kind, DataKind::Preference | DataKind::Unpaired));
    let total = |f: &dyn Fn(&DataReport) -> usize| reports.iter().map(f).sum::<usize>().to_string();
    // (header, cell of a report, cell of the total row)
    type Column<'a> = (String, Box<dyn Fn(&DataReport) -> String + 'a>, String);
    let mut columns: Vec<Column> = vec![
        ("file".into(), Box::new(|r| r.path.display().to_string()), format!("total ({} files)", reports.len())),
        ("format".into(), Box::new(|r| r.format_name().to_string()), String::new()),
        ("records".into(), Box::new(|r| r.records.to_string()), total(&|r| r.records)),
        ("invalid".into(), Box::new(|r| r.invalid.to_string()), total(&|r| r.invalid)),
    ];
    if with_skipped {
        columns.push(("skipped".into(), Box::new(|r| r.skipped.to_string()), total(&|r| r.skipped)));
    }
    if with_identical {
        columns.push((
            "identical pairs".into(),
            Box::new(|r| r.identical_pairs.to_string()),
            total(&|r| r.identical_pairs),
        ));
    }
    if with_lengths {
        let stat = |pick: fn(&LengthStats) -> usize| -> Box<dyn Fn(&DataReport) -> String> {
            Box::new(move |r| r.lengths.as_ref().map_or("-".to_string(), |l| pick(l).to_string()))
        };
        let longest = reports.iter().filter_map(|r| r.lengths).map(|l| l.max).max();
        columns.push(("p50 tok".into(), stat(|l| l.p50), String::new()));
        columns.push(("p95 tok".into(), stat(|l| l.p95), String::new()));
        columns.push(("max tok".into(), stat(|l| l.max), longest.map_or(String::new(), |m| m.to_string())));
        if let Some(m) = max_length {
            columns.push((
                format!("> {m} tok"),
                stat(|l| l.over_max_length),
                total(&|r| r.lengths.map_or(0, |l| l.over_max_length)),
            ));
        }
    }
    let mut rows: Vec<Vec<String>> = vec![columns.iter().map(|c| c.0.clone()).collect()];
    for r in reports {
        rows.push(columns.iter().map(|c| (c.1)(r)).collect());
    }
    if reports.len() > 1 {
        rows.push(columns.iter().map(|c| c.2.clone()).collect());
    }
    let columns = rows[0].len();
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                let pad = " ".repeat(widths[c] - cell.chars().count());
                if c < 2 {
                    format!("{cell}{pad}")
                } else {
                    format!("{pad}{cell}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
            out.push('\n');
        }
    }
    if reports.iter().any(|r| r.invalid > 0) {
        out.push_str("\ninvalid records:\n");
        for r in reports {
            let _ = r.write_invalid(&mut out, "  ");
        }
    }
    out
}

/// Token length of a record as its stage sees it.
pub(crate) trait MeasuredRecord: DataRecord {
    fn token_length(&self, tokenizer: &ModelTokenizer) -> Result<usize>;
}

impl MeasuredRecord for Document {
    /// The text encoded with special tokens.
    fn token_length(&self, tokenizer: &ModelTokenizer) -> Result<usize> {
        Ok(tokenizer.encode(&self.text, true)?.len())
    }
}

/// A conversation rendered with the chat template, as `apply_chat_template(tokenize=True)`.
fn rendered_length(
    tokenizer: &ModelTokenizer,
    messages: &[crate::text::chat::ChatMessage],
    add_generation_prompt: bool,
) -> Result<usize> {
    let text = tokenizer.apply_chat_template(messages, add_generation_prompt)?;
    Ok(tokenizer.encode(&text, false)?.len())
}

impl MeasuredRecord for Conversation {
    /// As SFT encodes it (with its tools; a template that leaves out tool calls or schemas makes
    /// the record invalid).
    fn token_length(&self, tokenizer: &ModelTokenizer) -> Result<usize> {
        if self.tools.is_empty() && self.messages.iter().all(|m| m.tool_calls.is_empty()) {
            return rendered_length(tokenizer, &self.to_messages(), false);
        }
        Ok(encode_conversation_with_tools(tokenizer, &self.to_messages(), &self.tools, false)?.input_ids.len())
    }
}

impl MeasuredRecord for PreferencePair {
    /// The longer of prompt + chosen and prompt + rejected.
    fn token_length(&self, tokenizer: &ModelTokenizer) -> Result<usize> {
        let chosen = rendered_length(tokenizer, &self.chosen_messages(), false)?;
        let rejected = rendered_length(tokenizer, &self.rejected_messages(), false)?;
        Ok(chosen.max(rejected))
    }
}

impl MeasuredRecord for UnpairedRecord {
    /// The prompt with its completion (a pair: the longer of its two sides).
    fn token_length(&self, tokenizer: &ModelTokenizer) -> Result<usize> {
        match self {
            UnpairedRecord::One(e) => rendered_length(tokenizer, &e.messages(), false),
            UnpairedRecord::Pair(p) => p.token_length(tokenizer),
        }
    }
}

impl MeasuredRecord for PromptRecord {
    /// The prompt rendered with the generation prompt.
    fn token_length(&self, tokenizer: &ModelTokenizer) -> Result<usize> {
        rendered_length(tokenizer, &self.messages, true)
    }
}

fn check_file<T: MeasuredRecord>(
    path: &Path,
    options: &DataOptions,
    tokenizer: Option<&ModelTokenizer>,
    max_length: Option<usize>,
) -> Result<DataReport> {
    let (records, mut report) = read_file::<T>(path, FileLayout::of(path)?, options, ReadMode::Check)?;
    if let Some(tok) = tokenizer {
        let mut lengths = Vec::with_capacity(records.len());
        for record in &records {
            match record.token_length(tok) {
                Ok(len) => lengths.push(len),
                Err(e) => {
                    // A template that rejects a record (e.g. a system message it does not support)
                    // makes the record unusable with this tokenizer.
                    report.records -= 1;
                    report.add_invalid(record.origin().clone(), format!("{e:#}"), options.max_invalid_shown);
                }
            }
        }
        report.lengths = LengthStats::from_lengths(&lengths, max_length);
    }
    Ok(report)
}

/// Checks data files as `align data check` does: every record of every file is read, invalid
/// records are listed in the reports (never an error), and with a tokenizer the token lengths
/// are measured (a record the chat template rejects is invalid). Errors are only for files that
/// cannot be found or read, and for a tokenizer without a chat template when one is needed.
pub fn check_files<P: AsRef<Path>>(
    kind: DataKind,
    paths: &[P],
    options: &DataOptions,
    tokenizer: Option<&ModelTokenizer>,
    max_length: Option<usize>,
) -> Result<Vec<DataReport>> {
    options.validate()?;
    if max_length.is_some() && tokenizer.is_none() {
        bail!("max_length: token lengths need a tokenizer");
    }
    if let Some(tok) = tokenizer {
        if kind != DataKind::Pretrain {
            tok.chat_template()?;
        }
    }
    let files = expand_data_paths(paths)?;
    files
        .iter()
        .map(|file| match kind {
            DataKind::Pretrain => check_file::<Document>(file, options, tokenizer, max_length),
            DataKind::Sft => check_file::<Conversation>(file, options, tokenizer, max_length),
            DataKind::Preference => check_file::<PreferencePair>(file, options, tokenizer, max_length),
            DataKind::Prompt => check_file::<PromptRecord>(file, options, tokenizer, max_length),
            DataKind::Unpaired => check_file::<UnpairedRecord>(file, options, tokenizer, max_length),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let lengths: Vec<usize> = (1..=100).collect();
        let s = LengthStats::from_lengths(&lengths, Some(90)).unwrap();
        assert_eq!((s.p50, s.p95, s.max, s.over_max_length), (50, 95, 100, 10));
        let s = LengthStats::from_lengths(&[7], None).unwrap();
        assert_eq!((s.p50, s.p95, s.max, s.over_max_length), (7, 7, 7, 0));
        assert!(LengthStats::from_lengths(&[], None).is_none());
    }
}
