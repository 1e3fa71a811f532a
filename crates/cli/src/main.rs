//! The `align` command line: generation, evaluation, model/tokenizer creation and benchmarks.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench;
mod bench_train;
mod chat;
mod common;
mod data_cmd;
mod eval;
mod eval_choice;
mod export;
mod generate;
mod init;
mod plan;
mod report_cmd;
mod run;
mod serve;
mod train;

#[derive(Parser)]
#[command(
    name = "align",
    version,
    about = "Train and run Llama-family language models through the alignment ladder (PT → SFT → RM → PPO/DPO)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from prompts with a model folder.
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal (multi-turn, streamed answers).
    Chat(chat::ChatArgs),
    /// Serve a model (and LoRA adapters) over the OpenAI API, with a web console at /.
    Serve(serve::ServeArgs),
    /// Serve the web console's run dashboard for run folders (no model).
    Board(serve::BoardArgs),
    /// Run a pipeline file: its stages in order, skipping what is up to date, resuming what was interrupted.
    Run(run::RunArgs),
    /// Train one stage (pretrain, sft, reward, dpo, ppo, grpo, rloo, reinforce-pp, kto, distill) from a TOML config; resumes from the newest checkpoint.
    Train(train::TrainArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Create a random-initialised model folder from a small TOML description and a tokenizer.
    Init(init::InitArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Data tools: check data files (formats, invalid records, token lengths); dedup, clean, mix, split, convert, stats.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Benchmarks that print their figures next to a reference implementation.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Merge a LoRA adapter into its base model and write a plain HF model folder.
    Export(export::ExportArgs),
    /// Print the memory plan of a training run: weights, gradients, optimizer, activations, logits, total.
    Plan(plan::PlanArgs),
    /// Show the libtorch build, threads and devices this binary sees.
    Env,
    /// Write RUN_DIR/report/report.html with PNG plots and a diagnosis of every stage of a run.
    Report(report_cmd::ReportArgs),
    /// Print the stages of a run: kind, status, steps, last loss/metric, duration, diagnosis.
    Status(report_cmd::StatusArgs),
    /// Compare runs: every eval result and final training figure side by side, and the recorded
    /// configuration keys that differ (a table, --json, or an --html page).
    Compare(report_cmd::CompareArgs),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity of a model on a text corpus (.txt lines or .jsonl `text`).
    Perplexity(eval::PerplexityArgs),
    /// Answer quality on SFT conversations: greedy answers to each conversation's last prompt,
    /// scored against its last assistant turn (BLEU-4, ROUGE-L, character F1, SQuAD-style exact
    /// match and token F1).
    Answers(eval::AnswersArgs),
    /// Pairwise accuracy and mean margin of a reward model on preference pairs.
    Reward(eval::RewardEvalArgs),
    /// Reward-model-judged win rate of a model over a baseline on prompts, with a 95% interval.
    Winrate(eval::WinrateArgs),
    /// Multiple-choice benchmarks (C-Eval, CMMLU, MMLU, MedQA layouts) scored as
    /// lm-evaluation-harness scores them: acc / acc_norm by option log-likelihood, exact_match by
    /// generation; per subject and overall with standard errors.
    Choice(eval_choice::ChoiceArgs),
    /// LLM-as-a-judge: a judge model (local folder or OpenAI-compatible endpoint) rates the
    /// model's answers 1–10, or compares them with a baseline's in both orders (MT-Bench rubrics).
    Judge(eval::JudgeArgs),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (with a ChatML chat template) on text files.
    Train(init::TokenizerTrainArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s at several batch sizes, optionally next to transformers.
    Generate(bench::BenchGenerateArgs),
    /// A stage's training loop on synthetic data: tokens/s, the step's split, peak memory, MFU.
    Train(bench_train::BenchTrainArgs),
}

/// Flags shared by every command that loads a model (turned into the core's one `ModelSpec`).
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model folder (HF layout) or a hub id present in the local HF cache (`export`: default
    /// the adapter's base_model_name_or_path).
    #[arg(long)]
    pub model: Option<String>,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA; `export`: the stored dtype of the
    /// merged weights, default the base checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Intra-op CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// LoRA adapter folder (PEFT layout) applied on top of --model (merged into it at load; its
    /// tokenizer files win over the model's).
    #[arg(long)]
    pub adapter: Option<String>,
}

/// Flags of the commands that can hold the model's base quantised (`generate`, `eval perplexity`).
#[derive(Args, Clone, Debug, Default)]
pub struct QuantArgs {
    /// Hold the decoder's projections quantised, dequantised on the fly per layer in --dtype:
    /// nf4 or fp4 (bitsandbytes' 4-bit layout, blocks of 64; an --adapter is attached on top,
    /// not merged) or int8 (LLM.int8-style: int8 weights with one absmax scale per row).
    #[arg(long, value_name = "nf4|fp4|int8")]
    pub quantize: Option<String>,
    /// With --quantize nf4|fp4: quantise the blocks' absmax again (8-bit, blocks of 256), as
    /// bitsandbytes' bnb_4bit_use_double_quant.
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
}

impl QuantArgs {
    /// The core's `Quantization` of these flags (None without --quantize).
    pub fn quantization(&self) -> anyhow::Result<Option<align_core::model::quant::Quantization>> {
        self.quantize
            .as_deref()
            .map(|m| align_core::model::quant::Quantization::from_flags(m, self.double_quant))
            .transpose()
    }
}

impl ModelArgs {
    /// The `--model` value; an error naming the flag when it is missing.
    pub fn model_name(&self) -> anyhow::Result<&str> {
        self.model.as_deref().ok_or_else(|| anyhow::anyhow!("--model: required (a model folder or a cached hub id)"))
    }

    /// The core's `ModelSpec` of these flags.
    pub fn spec(&self) -> anyhow::Result<align_core::load::spec::ModelSpec> {
        self.spec_of(self.model_name()?, self.adapter.as_deref())
    }

    /// A `ModelSpec` for another model on the same device, dtype and threads.
    pub fn spec_of(&self, model: &str, adapter: Option<&str>) -> anyhow::Result<align_core::load::spec::ModelSpec> {
        align_core::load::spec::ModelSpec::from_flags(model, adapter, &self.device, self.dtype.as_deref(), self.threads)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("ALIGN_LOG").unwrap_or_else(|_| "info".into()))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    align_core::model::device::enable_cpu_features();
    let cli = Cli::parse();
    if let Err(e) = join_world(&cli.command) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::serve(a),
        Command::Board(a) => serve::board(a),
        Command::Run(a) => run::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(EvalCommand::Perplexity(a)) => eval::perplexity(a),
        Command::Eval(EvalCommand::Answers(a)) => eval::answers(a),
        Command::Eval(EvalCommand::Reward(a)) => eval::reward(a),
        Command::Eval(EvalCommand::Winrate(a)) => eval::winrate(a),
        Command::Eval(EvalCommand::Choice(a)) => eval_choice::choice(a),
        Command::Eval(EvalCommand::Judge(a)) => eval::judge(a),
        Command::Init(a) => init::init(a),
        Command::Tokenizer(TokenizerCommand::Train(a)) => init::train_tokenizer(a),
        Command::Data(c) => data_cmd::run(c),
        Command::Bench(BenchCommand::Generate(a)) => bench::generate(a),
        Command::Bench(BenchCommand::Train(a)) => bench_train::train(a),
        Command::Export(a) => export::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Env => common::print_env(),
        Command::Report(a) => report_cmd::report(a),
        Command::Status(a) => report_cmd::status(a),
        Command::Compare(a) => report_cmd::compare(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let w = align_core::dist::world();
            if w.size() > 1 {
                eprintln!("error (rank {} of {}): {e:#}", w.rank(), w.size());
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Under torchrun (`WORLD_SIZE` > 1) `align train` and `align run` join the process group of
/// the job; any other command would run once per rank, so it is refused.
fn join_world(command: &Command) -> anyhow::Result<()> {
    if align_core::dist::config_from_env()?.is_none() {
        return Ok(());
    }
    match command {
        Command::Train(_) | Command::Run(_) => align_core::dist::init_from_env().map(|_| ()),
        _ => anyhow::bail!(
            "WORLD_SIZE > 1 (torchrun): only `align train` and `align run` are data-parallel; run this command as one process"
        ),
    }
}

/// A path argument that must exist.
pub fn existing(path: &PathBuf, what: &str) -> anyhow::Result<()> {
    if !path.exists() {
        anyhow::bail!("{}: {what} not found", path.display());
    }
    Ok(())
}
