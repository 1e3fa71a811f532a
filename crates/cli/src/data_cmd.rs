//! `align data …`: checks training data files before a run (formats, invalid records with
//! file:line, token lengths against a budget) and prints a table or one JSON object.
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use align_core::data::{check_files, reports_table, DataKind, DataOptions, RankedPairs, TextMode};
use align_core::hf::checkpoint::resolve_model_dir;
use align_core::ModelTokenizer;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Read data files as a stage would and report per file: detected format, records, invalid
    /// records (file:line and field) and, with --tokenizer, token lengths. Exits non-zero when
    /// any record is invalid.
    Check(CheckArgs),
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
