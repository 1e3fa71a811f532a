//! Training data for every stage: reads `.jsonl` / `.json` / `.txt` files (paths or globs),
//! detects each file's format (ShareGPT, OpenAI messages, Alpaca, TRL, MedicalGPT, LLaMA-Factory
//! …), turns records into conversations, preference pairs, prompts or documents, and reports per
//! file what was read. Every error names the file, the line, the field and what was expected.
//!
//! Entry points: [`read_pretrain`], [`read_sft`], [`read_preference`], [`read_prompts`],
//! [`read_unpaired`] (load for training), [`check_files`] (what `align data check` prints), [`split_by_ratio`] /
//! [`split_records`] (train/validation split), [`split_three_ways`] (train/validation/test) and
//! [`LengthBudget`] (token-length policy); `[data_options] mix` samples sources by weight when a
//! stage reads them ([`prep::mix`]). The preparation tools (`align data dedup | clean | mix |
//! split | convert | stats`) are in [`prep`]. The formats are documented in
//! `docs/data-formats.md`, the tools in `docs/data-prep.md`.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

mod budget;
mod fields;
mod formats;
mod preference;
pub mod prep;
mod pretrain;
mod prompt;
mod ranked;
mod reader;
mod report;
mod sft;
mod source;
mod split;
mod unpaired;

pub use budget::{LengthBudget, LengthBudgetCounts, LengthDecision, LengthPolicy};
pub use formats::DataFormat;
pub use preference::PreferencePair;
pub use pretrain::Document;
pub use prompt::PromptRecord;
pub use ranked::{ranked_pair_indices, scored_pair_indices, RankedPairs};
pub use reader::{read_preference, read_pretrain, read_prompts, read_sft, read_unpaired, LoadedData};
pub use report::{check_files, reports_table, DataReport, InvalidRecord, LengthStats};
pub use sft::Conversation;
pub use source::expand_data_paths;
pub use split::{shuffle_in_place, split_by_ratio, split_records, split_three_ways, SplitMix64};
pub use unpaired::UnpairedExample;

/// What a data file holds, i.e. which stage reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// Documents for next-token pretraining.
    Pretrain,
    /// Conversations for supervised fine-tuning.
    Sft,
    /// Chosen/rejected pairs for reward models and DPO.
    Preference,
    /// Prompts (with optional reference answers) for PPO/GRPO rollouts.
    Prompt,
    /// Unpaired desirable/undesirable completions for KTO (or preference pairs split into both).
    Unpaired,
}

impl DataKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::Pretrain => "pretrain",
            DataKind::Sft => "sft",
            DataKind::Preference => "preference",
            DataKind::Prompt => "prompt",
            DataKind::Unpaired => "unpaired",
        }
    }
}

impl fmt::Display for DataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DataKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pretrain" => Ok(DataKind::Pretrain),
            "sft" => Ok(DataKind::Sft),
            "preference" => Ok(DataKind::Preference),
            "prompt" => Ok(DataKind::Prompt),
            "unpaired" => Ok(DataKind::Unpaired),
            other => bail!("data kind: expected one of pretrain, sft, preference, prompt, unpaired, found '{other}'"),
        }
    }
}

/// How a `.txt` pretraining file is split into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextMode {
    /// Every non-empty line is one document.
    #[default]
    Line,
    /// The whole file is one document.
    File,
}

/// Options for reading data (`[data_options]` in a pipeline config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataOptions {
    /// false: the first invalid record is an error (`file:line: field …`); true: invalid records
    /// are left out and counted in each file's [`DataReport`].
    pub skip_invalid: bool,
    /// How `.txt` files are split into documents.
    pub text_mode: TextMode,
    /// Fraction of records held out for validation by [`split_by_ratio`] (0 = none).
    pub val_ratio: f64,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// Keep preference pairs whose chosen and rejected answers are identical (they are always
    /// counted in `identical_pairs`).
    pub keep_identical_pairs: bool,
    /// What a stage does with a sequence longer than its `max_length` (see [`LengthBudget`]).
    pub length_policy: LengthPolicy,
    /// How many invalid records a report lists (all are counted).
    pub max_invalid_shown: usize,
    /// Sampling weights per source: `{ "data/medical.jsonl" = 0.8, "data/general.jsonl" = 0.2 }`.
    /// The keys are files or patterns; every file of the read must be named by exactly one key
    /// and every key must name a file of the read. The weights are shares of the mixed data,
    /// rounded to whole records (see [`prep::mix::mix_counts`]), sampled with `seed`.
    pub mix: BTreeMap<String, f64>,
    /// Records of the mixed data; default: as many as the sources give without repeating one.
    pub mix_total: Option<usize>,
    /// Let a source too small for its share repeat records (else that is an error).
    pub mix_upsample: bool,
    /// Which preference pairs a ranked list gives (all, adjacent or best-vs-rest).
    pub ranked_pairs: RankedPairs,
    /// Drop duplicate records when a stage reads its data (before `mix` and the validation
    /// split), as `align data dedup` finds them; each drop is logged with file:line.
    pub dedup: DedupMode,
    /// With `dedup = "near"`: the Jaccard similarity of character 5-gram sets at which two
    /// records are near duplicates.
    pub dedup_threshold: f64,
}

/// Which duplicates `[data_options] dedup` drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// Keep every record.
    #[default]
    None,
    /// Records whose normalised text equals an earlier one's.
    Exact,
    /// Exact duplicates and near duplicates (MinHash/LSH, verified by Jaccard ≥ `dedup_threshold`).
    Near,
}

/// The default `dedup_threshold`.
pub const DEFAULT_DEDUP_THRESHOLD: f64 = 0.8;

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            skip_invalid: false,
            text_mode: TextMode::Line,
            val_ratio: 0.0,
            seed: 42,
            keep_identical_pairs: false,
            length_policy: LengthPolicy::Truncate,
            max_invalid_shown: 20,
            mix: BTreeMap::new(),
            mix_total: None,
            mix_upsample: false,
            ranked_pairs: RankedPairs::All,
            dedup: DedupMode::None,
            dedup_threshold: DEFAULT_DEDUP_THRESHOLD,
        }
    }
}

impl DataOptions {
    /// Checks the values a user can get wrong (`val_ratio` outside [0, 1)).
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.val_ratio) {
            bail!("data_options.val_ratio: expected a number in [0, 1), found {}", self.val_ratio);
        }
        for (source, weight) in &self.mix {
            if !(weight.is_finite() && *weight > 0.0) {
                bail!("data_options.mix.\"{source}\": expected a weight > 0, found {weight}");
            }
        }
        if !(self.dedup_threshold > 0.0 && self.dedup_threshold <= 1.0) {
            bail!("data_options.dedup_threshold: expected a number in (0, 1], found {}", self.dedup_threshold);
        }
        if self.dedup != DedupMode::Near && self.dedup_threshold != DEFAULT_DEDUP_THRESHOLD {
            bail!("data_options.dedup_threshold: only used with data_options.dedup = \"near\"");
        }
        if self.mix.is_empty() && (self.mix_total.is_some() || self.mix_upsample) {
            let key = if self.mix_total.is_some() { "mix_total" } else { "mix_upsample" };
            bail!("data_options.{key}: only used with data_options.mix, which is not set");
        }
        Ok(())
    }

    /// These options without the mix (validation files are read as they are).
    pub fn without_mix(&self) -> DataOptions {
        DataOptions { mix: BTreeMap::new(), mix_total: None, mix_upsample: false, ..self.clone() }
    }
}

/// Where a record came from: the file, the 1-based line it starts on and, for a `.json` array,
/// its 1-based position in the array. Displays as `file:line` (`file:line (item N)` for arrays).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub array_item: Option<usize>,
}

impl Origin {
    pub fn line(file: &Path, line: usize) -> Self {
        Origin { file: file.to_path_buf(), line, array_item: None }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(item) = self.array_item {
            write!(f, " (item {item})")?;
        }
        Ok(())
    }
}

pub use crate::hf::config::json_kind_name as kind_name;

/// One text record and where it came from (1-based line; for a `.json` array, the item number).
#[derive(Debug, Clone, PartialEq)]
pub struct TextRecord {
    pub text: String,
    pub line: usize,
}

/// Reads the text records of one file: `.jsonl` / `.json` (`text` field of each record), any
/// other extension as plain text with one record per non-empty line. The first invalid record
/// is an error naming file and line.
pub fn read_text_records(path: &Path) -> Result<Vec<TextRecord>> {
    let documents = reader::read_documents_of_file(path, TextMode::Line)?;
    Ok(documents
        .into_iter()
        .map(|d| TextRecord { line: d.origin.array_item.unwrap_or(d.origin.line), text: d.text })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_txt_and_jsonl_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("a.txt");
        std::fs::write(&txt, "first\n\n  \nsecond\n").unwrap();
        let recs = read_text_records(&txt).unwrap();
        assert_eq!(
            recs,
            vec![TextRecord { text: "first".into(), line: 1 }, TextRecord { text: "second".into(), line: 4 }]
        );
        let jl = dir.path().join("b.jsonl");
        std::fs::write(&jl, "{\"text\":\"ok\"}\n{\"text\":3}\n").unwrap();
        let e = read_text_records(&jl).unwrap_err().to_string();
        assert!(e.ends_with("b.jsonl:2: field 'text': expected a string, found a number"), "{e}");
    }

    #[test]
    fn dedup_option_drops_exact_and_near_duplicates_when_a_stage_reads() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sft.jsonl");
        let conv = |q: &str, a: &str| {
            serde_json::json!({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
                .to_string()
        };
        let answer =
            "高血压患者应当低盐饮食，每天食盐不超过五克，同时规律运动、戒烟限酒，并按医嘱长期服药，定期监测血压。";
        let lines = [
            conv("高血压患者饮食要注意什么？", answer),
            conv(
                "糖尿病有哪些典型症状？",
                "多饮、多尿、多食和体重下降是糖尿病的典型症状，应尽早检查血糖并在医生指导下治疗。",
            ),
            conv("高血压患者饮食要注意什么？", answer), // exact
            conv("高血压患者饮食要注意什么?", &answer.replace("五克", "6克")), // near
        ];
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        let read = |mode: DedupMode| {
            read_sft(&[&f], &DataOptions { dedup: mode, ..Default::default() }).unwrap().records.len()
        };
        assert_eq!((read(DedupMode::None), read(DedupMode::Exact), read(DedupMode::Near)), (4, 3, 2));
        let o: DataOptions = serde_json::from_str(r#"{"dedup": "near", "dedup_threshold": 0.7}"#).unwrap();
        assert_eq!((o.dedup, o.dedup_threshold), (DedupMode::Near, 0.7));
        let o: DataOptions = serde_json::from_str(r#"{"dedup": "exact", "dedup_threshold": 0.7}"#).unwrap();
        assert!(o.validate().unwrap_err().to_string().contains("only used with data_options.dedup = \"near\""));
    }

    #[test]
    fn options_deserialise_with_defaults_and_reject_unknown_fields() {
        let o: DataOptions = serde_json::from_str(r#"{"skip_invalid": true, "text_mode": "file"}"#).unwrap();
        assert!(o.skip_invalid);
        assert_eq!(o.text_mode, TextMode::File);
        assert_eq!(o.max_invalid_shown, 20);
        let e = serde_json::from_str::<DataOptions>(r#"{"skip_invalids": true}"#).unwrap_err().to_string();
        assert!(e.contains("skip_invalids"), "{e}");
        assert!(DataOptions { val_ratio: 1.0, ..Default::default() }.validate().is_err());
    }
}
