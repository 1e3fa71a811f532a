//! `align tokenizer train` (byte-level BPE + ChatML template) and `align init` (a random-initialised
//! Llama-family model folder from a small TOML description and a tokenizer folder).
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use align_core::hf::folder::check_replaceable;
use align_core::text::tokenizer_train::{train_bpe_tokenizer, BpeTraining, MIN_VOCAB_SIZE};

#[derive(Args)]
pub struct TokenizerTrainArgs {
    /// Target vocabulary size (including the 256 byte symbols and 3 special tokens).
    #[arg(long)]
    pub vocab_size: usize,
    /// Output folder (tokenizer.json, tokenizer_config.json, chat_template.jinja): new, empty,
    /// or a tokenizer/model folder (replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even when it holds files other than a model folder's (never an input).
    #[arg(long)]
    pub force: bool,
    /// Pairs must occur at least this often to be merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Training files: .txt (lines) or .jsonl/.json (every string value in each record).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `align tokenizer train`: align-core's BPE training (the pipeline's `tokenizer` stage runs the same).
pub fn train_tokenizer(args: TokenizerTrainArgs) -> Result<()> {
    if args.vocab_size < MIN_VOCAB_SIZE {
        bail!(
            "--vocab-size: a byte-level BPE needs at least {MIN_VOCAB_SIZE} entries (256 bytes + specials), found {}",
            args.vocab_size
        );
    }
    for f in &args.files {
        crate::existing(f, "training file")?;
    }
    let inputs: Vec<&std::path::Path> = args.files.iter().map(|f| f.as_path()).collect();
    check_replaceable(&args.out, &inputs, args.force, "--out")?;
    let spec = BpeTraining { vocab_size: args.vocab_size, min_frequency: args.min_frequency, files: args.files };
    let trained = train_bpe_tokenizer(&spec, &args.out)?;
    eprintln!(
        "trained a {}-token byte-level BPE on {} texts → {}",
        trained.vocab_size,
        trained.texts,
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct InitArgs {
    /// Model description (TOML): model_type, hidden_size, intermediate_size, num_hidden_layers, …
    #[arg(long)]
    pub config: PathBuf,
    /// Tokenizer folder; its files are copied into the model and fix vocab_size and token ids.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output folder: new, empty, or a model folder (replaced); never an input.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even when it holds files other than a model folder's (never an input).
    #[arg(long)]
    pub force: bool,
    /// Seed of the random initialisation (overrides `seed` in the TOML).
    #[arg(long)]
    pub seed: Option<i64>,
}

pub fn init(args: InitArgs) -> Result<()> {
    crate::existing(&args.config, "model description")?;
    crate::existing(&args.tokenizer, "tokenizer folder")?;
    check_replaceable(&args.out, &[&args.config, &args.tokenizer], args.force, "--out")?;
    let config = align_core::model::init::init_model(&args.config, &args.tokenizer, &args.out, args.seed)?;
    eprintln!(
        "initialised a {} model with {} parameters → {}",
        config.model_type.as_str(),
        crate::common::human_count(config.num_parameters()),
        args.out.display()
    );
    Ok(())
}
