//! `align data …`: checks training data files before a run (formats, invalid records with
//! file:line, token lengths against a budget) and prepares them (dedup, clean, mix, split,
//! convert, stats — the work is in `align_core::data::prep`); prints a table or one JSON object.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use align_core::data::prep::clean::{clean_files, CleanRules};
use align_core::data::prep::convert::{convert_files, Target};
use align_core::data::prep::dedup::{find_duplicates, DedupConfig, KeptRecord};
use align_core::data::prep::mix::{mix_records, MixSource};
use align_core::data::prep::stats::{data_stats, stats_table};
use align_core::data::prep::{
    check_output_extension, output_extension, read_prep_files, write_lines, PrepFile, PrepRecord,
};
use align_core::data::{
    check_files, reports_table, split_three_ways, DataFormat, DataKind, DataOptions, RankedPairs, TextMode,
};
use align_core::hf::checkpoint::resolve_model_dir;
use align_core::ModelTokenizer;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Read data files as a stage would and report per file: detected format, records, invalid
    /// records (file:line and field) and, with --tokenizer, token lengths. Exits non-zero when
    /// any record is invalid.
    Check(CheckArgs),
    /// Remove exact duplicates (normalised text) and near duplicates (MinHash + LSH over
    /// character 5-grams, verified Jaccard ≥ --near-threshold), and training records that
    /// duplicate an --eval record; writes the kept lines byte for byte and lists every drop.
    Dedup(DedupArgs),
    /// Remove HTML remnants, control characters and extra whitespace; drop records outside
    /// --min-chars / --max-chars or not in --lang; reports each change and drop with file:line.
    Clean(CleanArgs),
    /// Mix sources by weight (shares of the output, rounded to whole records), seeded; prints
    /// the realised counts and shares.
    Mix(MixArgs),
    /// Split records into train / validation / test files (raw lines kept), seeded.
    Split(SplitArgs),
    /// Convert records between ShareGPT, OpenAI messages and Alpaca, or between preference
    /// layouts (TRL, TRL implicit prompt, MedicalGPT, LLaMA-Factory).
    Convert(ConvertArgs),
    /// Record counts, character and token lengths (histogram), turns and languages per file.
    Stats(StatsArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Pretrain,
    Sft,
    Preference,
    Prompt,
    Unpaired,
}

impl From<KindArg> for DataKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Pretrain => DataKind::Pretrain,
            KindArg::Sft => DataKind::Sft,
            KindArg::Preference => DataKind::Preference,
            KindArg::Prompt => DataKind::Prompt,
            KindArg::Unpaired => DataKind::Unpaired,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TextModeArg {
    /// One document per non-empty line.
    Line,
    /// The whole file is one document.
    File,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RankedPairsArg {
    All,
    Adjacent,
    BestVsRest,
}

#[derive(Args)]
pub struct CheckArgs {
    /// What the files hold (which stage reads them).
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// A model or tokenizer folder (or a hub id in the local HF cache); measures token lengths:
    /// sft and preference records rendered with its chat template, prompts with the generation
    /// prompt, pretraining text encoded with special tokens.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Count the records longer than this many tokens (needs --tokenizer).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// How .txt pretraining files are split into documents.
    #[arg(long, value_enum, default_value = "line")]
    pub text_mode: TextModeArg,
    /// How many invalid records to list per file (all are counted).
    #[arg(long, default_value_t = 20)]
    pub show_invalid: usize,
    /// Which preference pairs a ranked list of answers gives: all K(K-1)/2, adjacent ones
    /// (K-1) or the best against each other one (K-1).
    #[arg(long, value_enum, default_value = "all")]
    pub ranked_pairs: RankedPairsArg,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Data files, folders or glob patterns (`data/sft/*.jsonl`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Check(args) => check(args),
        DataCommand::Dedup(args) => dedup(args),
        DataCommand::Clean(args) => clean(args),
        DataCommand::Mix(args) => mix(args),
        DataCommand::Split(args) => split(args),
        DataCommand::Convert(args) => convert(args),
        DataCommand::Stats(args) => stats(args),
    }
}

fn check(args: CheckArgs) -> Result<()> {
    let kind = DataKind::from(args.kind);
    if args.max_length.is_some() && args.tokenizer.is_none() {
        bail!("--max-length: token lengths need --tokenizer");
    }
    let tokenizer = match &args.tokenizer {
        Some(spec) => Some(ModelTokenizer::from_dir(&resolve_model_dir(spec)?)?),
        None => None,
    };
    let options = DataOptions {
        text_mode: match args.text_mode {
            TextModeArg::Line => TextMode::Line,
            TextModeArg::File => TextMode::File,
        },
        max_invalid_shown: args.show_invalid,
        ranked_pairs: match args.ranked_pairs {
            RankedPairsArg::All => RankedPairs::All,
            RankedPairsArg::Adjacent => RankedPairs::Adjacent,
            RankedPairsArg::BestVsRest => RankedPairs::BestVsRest,
        },
        ..DataOptions::default()
    };
    let reports = check_files(kind, &args.files, &options, tokenizer.as_ref(), args.max_length)?;
    let invalid: usize = reports.iter().map(|r| r.invalid).sum();
    let files_with_invalid = reports.iter().filter(|r| r.invalid > 0).count();
    if args.json {
        let out = json!({
            "kind": kind,
            "ok": invalid == 0,
            "records": reports.iter().map(|r| r.records).sum::<usize>(),
            "invalid": invalid,
            "tokenizer": tokenizer.as_ref().map(|t| t.dir.display().to_string()),
            "max_length": args.max_length,
            "files": reports,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", reports_table(&reports));
    }
    if invalid > 0 {
        let records = if invalid == 1 { "record" } else { "records" };
        let files = if reports.len() == 1 { "file" } else { "files" };
        bail!("{invalid} invalid {records} in {files_with_invalid} of {} {files}", reports.len());
    }
    Ok(())
}

#[derive(Args)]
pub struct DedupArgs {
    /// What the files hold (decides each record's text: see docs/data-prep.md).
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Evaluation files: training records that duplicate one of their records are dropped
    /// (eval-leak); these files are not changed. Repeat for more files.
    #[arg(long = "eval", value_name = "FILE")]
    pub eval: Vec<PathBuf>,
    /// Jaccard similarity of character 5-gram sets at or above which two records are near
    /// duplicates.
    #[arg(long, default_value_t = 0.8)]
    pub near_threshold: f64,
    /// Seed of the MinHash functions.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write each input's kept records to DIR/<its file name> (`.json` inputs as `.jsonl`).
    #[arg(long, value_name = "DIR", conflicts_with = "output")]
    pub out: Option<PathBuf>,
    /// Write all kept records to one file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Data files, folders or glob patterns.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct CleanArgs {
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Drop records whose cleaned text has fewer characters.
    #[arg(long)]
    pub min_chars: Option<usize>,
    /// Drop records whose cleaned text has more characters.
    #[arg(long)]
    pub max_chars: Option<usize>,
    /// Keep only records in these languages (zh, ja, ko, en, ru, ar, hi, el, th, unknown;
    /// comma-separated), as the script-based detector sees them.
    #[arg(long, value_delimiter = ',')]
    pub lang: Vec<String>,
    /// The cleaned file.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct MixArgs {
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// A source and its weight, FILE=WEIGHT (a file, folder or glob pattern); repeat per source.
    /// Weights are shares of the output (normalised to sum to 1).
    #[arg(long = "source", value_name = "FILE=WEIGHT", required = true)]
    pub sources: Vec<String>,
    /// Records of the output; default: as many as the sources give without repeating a record.
    #[arg(long)]
    pub total: Option<usize>,
    /// Let a source too small for its share repeat records (else that is an error).
    #[arg(long)]
    pub upsample: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SplitArgs {
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Fraction of the records for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val: f64,
    /// Fraction of the records for test.
    #[arg(long, default_value_t = 0.1)]
    pub test: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Writes DIR/train, DIR/validation and DIR/test (.jsonl, or .txt for text files).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FromArg {
    Sharegpt,
    Openai,
    Alpaca,
    PromptCompletion,
    Medicalgpt,
    LlamaFactory,
    Trl,
    TrlImplicit,
    AlpacaPairs,
    QuestionResponse,
}

impl FromArg {
    fn format(self) -> DataFormat {
        match self {
            FromArg::Sharegpt => DataFormat::ShareGpt,
            FromArg::Openai => DataFormat::OpenAiMessages,
            FromArg::Alpaca => DataFormat::Alpaca,
            FromArg::PromptCompletion => DataFormat::PromptCompletion,
            FromArg::Medicalgpt => DataFormat::MedicalGptPairs,
            FromArg::LlamaFactory => DataFormat::LlamaFactoryPairs,
            FromArg::Trl => DataFormat::TrlPairs,
            FromArg::TrlImplicit => DataFormat::TrlImplicitPairs,
            FromArg::AlpacaPairs => DataFormat::AlpacaPairs,
            FromArg::QuestionResponse => DataFormat::QuestionResponsePairs,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ToArg {
    Sharegpt,
    Openai,
    Alpaca,
    Trl,
    TrlImplicit,
    Medicalgpt,
    LlamaFactory,
}

impl From<ToArg> for Target {
    fn from(t: ToArg) -> Self {
        match t {
            ToArg::Sharegpt => Target::ShareGpt,
            ToArg::Openai => Target::OpenAi,
            ToArg::Alpaca => Target::Alpaca,
            ToArg::Trl => Target::Trl,
            ToArg::TrlImplicit => Target::TrlImplicit,
            ToArg::Medicalgpt => Target::MedicalGpt,
            ToArg::LlamaFactory => Target::LlamaFactory,
        }
    }
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The input's layout (checked against the detected format); detected when not given.
    #[arg(long, value_enum)]
    pub from: Option<FromArg>,
    /// The layout to write: sharegpt, openai, alpaca (SFT) or trl, trl-implicit, medicalgpt,
    /// llama-factory (preference pairs).
    #[arg(long, value_enum)]
    pub to: ToArg,
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct StatsArgs {
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// A model or tokenizer folder: token lengths as the stage measures them, and a histogram.
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// An output must not be one of the inputs.
fn refuse_overwrite(output: &Path, files: &[PrepFile]) -> Result<()> {
    let out = canonical(output);
    if let Some(f) = files.iter().find(|f| canonical(&f.path) == out) {
        bail!("{}: is an input; write the output to another file", f.path.display());
    }
    Ok(())
}

fn write_json_report(path: &Path, report: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("{}: cannot write the report", path.display()))
}

/// The file a `--out DIR` output of `file` gets: its name, `.json` written as `.jsonl`.
fn out_path(dir: &Path, file: &Path) -> Result<PathBuf> {
    let name = file.file_name().ok_or_else(|| anyhow!("{}: not a file name", file.display()))?;
    let mut path = dir.join(name);
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        path.set_extension("jsonl");
    }
    Ok(path)
}

fn dedup(args: DedupArgs) -> Result<()> {
    let kind = DataKind::from(args.kind);
    let config = DedupConfig { near_threshold: args.near_threshold, seed: args.seed, ..DedupConfig::default() };
    config.validate().map_err(|e| anyhow!("--near-threshold: {e}"))?;
    let train = read_prep_files(kind, &args.files, None)?;
    let eval = if args.eval.is_empty() { Vec::new() } else { read_prep_files(kind, &args.eval, None)? };
    for e in &eval {
        if train.iter().any(|t| canonical(&t.path) == canonical(&e.path)) {
            bail!("{}: given both as data and as --eval", e.path.display());
        }
    }
    let flat = |files: &[PrepFile]| -> Vec<(usize, usize)> {
        files.iter().enumerate().flat_map(|(f, file)| (0..file.records.len()).map(move |r| (f, r))).collect()
    };
    let (train_at, eval_at) = (flat(&train), flat(&eval));
    let record = |files: &[PrepFile], at: (usize, usize)| -> String { files[at.0].records[at.1].origin.to_string() };
    let train_texts: Vec<&str> = train_at.iter().map(|&(f, r)| train[f].records[r].text.as_str()).collect();
    let eval_texts: Vec<&str> = eval_at.iter().map(|&(f, r)| eval[f].records[r].text.as_str()).collect();
    let duplicates = find_duplicates(&train_texts, &eval_texts, &config)?;
    let mut dropped = vec![false; train_at.len()];
    let mut entries = Vec::with_capacity(duplicates.len());
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &duplicates {
        dropped[d.record] = true;
        *by_reason.entry(d.reason.as_str()).or_insert(0) += 1;
        let of = match d.of {
            KeptRecord::Train(i) => record(&train, train_at[i]),
            KeptRecord::Eval(i) => record(&eval, eval_at[i]),
        };
        entries.push(json!({
            "record": record(&train, train_at[d.record]),
            "reason": d.reason.as_str(),
            "duplicate_of": of,
            "similarity": (d.similarity * 10000.0).round() / 10000.0,
        }));
    }
    let kept_of = |f: usize| -> Vec<&str> {
        train_at
            .iter()
            .zip(&dropped)
            .filter(|((file, _), d)| *file == f && !**d)
            .map(|(&(file, r), _)| train[file].records[r].raw.as_str())
            .collect()
    };
    let mut written = Vec::new();
    if let Some(dir) = &args.out {
        let mut paths: Vec<PathBuf> = Vec::with_capacity(train.len());
        for file in &train {
            let path = out_path(dir, &file.path)?;
            if paths.contains(&path) {
                bail!(
                    "--out {}: two inputs are named {}; write them with --output or one at a time",
                    dir.display(),
                    path.display()
                );
            }
            refuse_overwrite(&path, &train)?;
            paths.push(path);
        }
        for (f, path) in paths.iter().enumerate() {
            write_lines(path, kept_of(f))?;
            written.push(path.display().to_string());
        }
    }
    if let Some(path) = &args.output {
        check_output_extension(path, &train)?;
        refuse_overwrite(path, &train)?;
        write_lines(path, (0..train.len()).flat_map(kept_of))?;
        written.push(path.display().to_string());
    }
    let report = json!({
        "kind": kind,
        "near_threshold": args.near_threshold,
        "records": train_at.len(),
        "eval_records": eval_at.len(),
        "kept": train_at.len() - duplicates.len(),
        "dropped": duplicates.len(),
        "dropped_by_reason": by_reason,
        "written": written,
        "duplicates": entries,
    });
    if let Some(path) = &args.report {
        write_json_report(path, &report)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let rows: Vec<[String; 4]> = report["duplicates"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    [
                        e["record"].as_str().unwrap_or_default().to_string(),
                        e["reason"].as_str().unwrap_or_default().to_string(),
                        format!("{:.3}", e["similarity"].as_f64().unwrap_or_default()),
                        e["duplicate_of"].as_str().unwrap_or_default().to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print!("{}", table(&["dropped record", "reason", "similarity", "duplicate of (kept)"], &rows));
    let reasons: Vec<String> = by_reason.iter().map(|(r, n)| format!("{n} {r}")).collect();
    println!(
        "{} records, {} kept, {} dropped{}",
        train_at.len(),
        train_at.len() - duplicates.len(),
        duplicates.len(),
        if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
    );
    for w in &written {
        println!("wrote {w}");
    }
    Ok(())
}

/// A plain left-aligned table with a dashed rule under the header.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(c.chars().count()))))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out += &line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        out += &line(r.to_vec());
    }
    out
}

fn clean(args: CleanArgs) -> Result<()> {
    let kind = DataKind::from(args.kind);
    let rules = CleanRules { min_chars: args.min_chars, max_chars: args.max_chars, languages: args.lang.clone() };
    rules.validate().map_err(|e| anyhow!("--lang / --min-chars / --max-chars: {e}"))?;
    let files = read_prep_files(kind, &args.files, None)?;
    check_output_extension(&args.output, &files)?;
    refuse_overwrite(&args.output, &files)?;
    let outcome = clean_files(kind, &files, &rules)?;
    write_lines(&args.output, outcome.lines.iter().map(String::as_str))?;
    let report = json!({
        "kind": kind,
        "records": outcome.records,
        "kept": outcome.records - outcome.dropped,
        "changed": outcome.changed,
        "dropped": outcome.dropped,
        "output": args.output.display().to_string(),
        "entries": outcome.entries,
    });
    if let Some(path) = &args.report {
        write_json_report(path, &report)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let rows: Vec<[String; 3]> =
        outcome.entries.iter().map(|e| [e.origin.to_string(), e.action.to_string(), e.reasons.join("; ")]).collect();
    print!("{}", table(&["record", "action", "why"], &rows));
    println!(
        "{} records, {} kept ({} changed), {} dropped; wrote {}",
        outcome.records,
        outcome.records - outcome.dropped,
        outcome.changed,
        outcome.dropped,
        args.output.display()
    );
    Ok(())
}

fn mix(args: MixArgs) -> Result<()> {
    let kind = DataKind::from(args.kind);
    let mut sources = Vec::with_capacity(args.sources.len());
    let mut all_files = Vec::new();
    for spec in &args.sources {
        let (path, weight) = spec
            .rsplit_once('=')
            .ok_or_else(|| anyhow!("--source {spec}: expected FILE=WEIGHT (e.g. data/medical.jsonl=0.8)"))?;
        let weight: f64 =
            weight.trim().parse().map_err(|_| anyhow!("--source {spec}: weight '{weight}' is not a number"))?;
        let files = read_prep_files(kind, &[path], None)?;
        let records: Vec<PrepRecord> = files.iter().flat_map(|f| f.records.iter().cloned()).collect();
        sources.push((MixSource { name: path.to_string(), weight, available: records.len() }, records));
        all_files.extend(files);
    }
    check_output_extension(&args.output, &all_files)?;
    refuse_overwrite(&args.output, &all_files)?;
    let (records, shares) = mix_records(sources, args.total, args.upsample, args.seed)?;
    write_lines(&args.output, records.iter().map(|r| r.raw.as_str()))?;
    if args.json {
        let out = json!({"kind": kind, "seed": args.seed, "records": records.len(), "output": args.output.display().to_string(), "sources": shares});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let rows: Vec<[String; 6]> = shares
        .iter()
        .map(|s| {
            [
                s.source.clone(),
                format!("{}", s.weight),
                s.available.to_string(),
                s.records.to_string(),
                format!("{:.1}%", s.share * 100.0),
                s.repeated.to_string(),
            ]
        })
        .collect();
    print!("{}", table(&["source", "weight", "available", "records", "share", "repeated"], &rows));
    println!("{} records (seed {}); wrote {}", records.len(), args.seed, args.output.display());
    Ok(())
}

fn split(args: SplitArgs) -> Result<()> {
    let kind = DataKind::from(args.kind);
    let files = read_prep_files(kind, &args.files, None)?;
    let ext = output_extension(&files)?;
    let records: Vec<&PrepRecord> = files.iter().flat_map(|f| f.records.iter()).collect();
    let (train, val, test) =
        split_three_ways(records.len(), args.val, args.test, args.seed).map_err(|e| anyhow!("--val / --test: {e}"))?;
    let mut counts = Vec::new();
    for (name, indices) in [("train", &train), ("validation", &val), ("test", &test)] {
        let path = args.out.join(format!("{name}.{ext}"));
        refuse_overwrite(&path, &files)?;
        write_lines(&path, indices.iter().map(|&i| records[i].raw.as_str()))?;
        counts.push((name, indices.len(), path));
    }
    if args.json {
        let out: serde_json::Map<String, Value> = counts
            .iter()
            .map(|(n, c, p)| (n.to_string(), json!({"records": c, "path": p.display().to_string()})))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"kind": kind, "seed": args.seed, "records": records.len(), "splits": out})
            )?
        );
        return Ok(());
    }
    let rows: Vec<[String; 3]> =
        counts.iter().map(|(n, c, p)| [n.to_string(), c.to_string(), p.display().to_string()]).collect();
    print!("{}", table(&["split", "records", "file"], &rows));
    println!("{} records (seed {})", records.len(), args.seed);
    Ok(())
}

fn convert(args: ConvertArgs) -> Result<()> {
    let target = Target::from(args.to);
    if canonical(&args.input) == canonical(&args.output) {
        bail!("{}: is the input; write the output to another file", args.output.display());
    }
    if args.output.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        bail!("{}: the output holds one record per line; expected a .jsonl file", args.output.display());
    }
    let (lines, files) = convert_files(&[&args.input], args.from.map(FromArg::format), target)?;
    write_lines(&args.output, lines.iter().map(String::as_str))?;
    for f in &files {
        println!(
            "{}: {} records ({}) → {} ({})",
            f.path.display(),
            f.records,
            f.format.map_or("-", |x| x.name()),
            args.output.display(),
            target.format().name()
        );
    }
    Ok(())
}

fn stats(args: StatsArgs) -> Result<()> {
    let kind = DataKind::from(args.kind);
    let tokenizer = match &args.tokenizer {
        Some(spec) => Some(ModelTokenizer::from_dir(&resolve_model_dir(spec)?)?),
        None => None,
    };
    let files = read_prep_files(kind, &args.files, tokenizer.as_ref())?;
    let (per_file, total) = data_stats(&files);
    if args.json {
        let out = json!({"kind": kind, "tokenizer": tokenizer.as_ref().map(|t| t.dir.display().to_string()), "files": per_file, "total": total});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", stats_table(&per_file, &total));
    }
    Ok(())
}
