//! `align eval choice`: multiple-choice benchmarks (C-Eval, CMMLU, MMLU, MedQA layouts) scored as
//! lm-evaluation-harness scores them; per-subject and overall accuracy with standard errors.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use align_core::eval::choice::{
    evaluate_choice, read_choice_files, ChoiceOptions, ChoiceReport, ChoiceScoring, ChoiceTemplate, MeanStderr,
};

use crate::common::load_session_quantized;
use crate::{ModelArgs, QuantArgs};

#[derive(Args)]
pub struct ChoiceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Items to score (.jsonl / .json / .csv; repeatable): C-Eval/CMMLU (`question`, `A`…`D`,
    /// letter `answer`), MMLU (`question`, `choices`, integer `answer`; or its header-less CSVs),
    /// MedQA (`options` map, `answer_idx`). An item's subject is its `subject` field, else the
    /// file name without a `_test`/`_val`/`_dev` suffix.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Solved examples (the dev split; repeatable): each item gets the first --shots dev items of
    /// its subject, as lm-eval's `first_n` sampler.
    #[arg(long)]
    pub dev: Vec<PathBuf>,
    /// Solved examples before each item.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// The lm-eval task layout prompts are rendered in: mmlu, cmmlu, ceval or medqa.
    #[arg(long, default_value = "mmlu")]
    pub template: String,
    /// Render each prompt through the model's chat template (description as the system message,
    /// each example a user and an assistant turn), as lm-eval's --apply_chat_template.
    #[arg(long)]
    pub chat: bool,
    /// loglikelihood (acc, acc_norm), generate (greedy answer's first option letter:
    /// exact_match) or both.
    #[arg(long, default_value = "loglikelihood")]
    pub scoring: String,
    /// Items per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest sequence in tokens (longer contexts keep their last tokens, as lm-eval cuts
    /// them); default the model's max_position_embeddings, lm-eval's default.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Answer length limit with --scoring generate|both.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Use only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write one JSON line per item (log-likelihoods, prediction, generated answer) here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Print one JSON object (subjects, overall, settings) instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn choice(args: ChoiceArgs) -> Result<()> {
    for d in args.data.iter().chain(&args.dev) {
        crate::existing(d, "data file")?;
    }
    let template: ChoiceTemplate = args.template.parse().context("--template")?;
    let scoring: ChoiceScoring = args.scoring.parse().context("--scoring")?;
    if args.batch_size == 0 {
        bail!("--batch-size: expected at least 1, found 0");
    }
    if args.limit == Some(0) {
        bail!("--limit: expected at least 1, found 0");
    }
    if args.shots > 0 && args.dev.is_empty() {
        bail!("--shots {}: needs --dev files with solved examples", args.shots);
    }
    if let Some(n) = args.max_length.filter(|&n| n < 2) {
        bail!("--max-length: expected at least 2 tokens, found {n}");
    }
    let mut items = read_choice_files(&args.data)?;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    let dev = if args.dev.is_empty() { Vec::new() } else { read_choice_files(&args.dev)? };
    let s = load_session_quantized(&args.model, &args.quant)?;
    if args.chat {
        s.tokenizer.chat_template().context("--chat")?;
    }
    let opts = ChoiceOptions {
        template,
        shots: args.shots,
        chat: args.chat,
        scoring,
        batch: args.batch_size,
        max_length: args.max_length,
        max_new_tokens: args.max_new_tokens,
    };
    let started = std::time::Instant::now();
    let report = evaluate_choice(&s.model.lm, &s.tokenizer, &items, &dev, &opts)?;
    tracing::info!("scored {} items in {:.2}s", items.len(), started.elapsed().as_secs_f64());
    if let Some(out) = &args.output {
        write_items(out, &report)?;
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("items");
            o.insert("model".into(), s.model.dir.display().to_string().into());
        }
        println!("{v}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn write_items(path: &PathBuf, report: &ChoiceReport) -> Result<()> {
    let lines = report.items.iter().map(serde_json::to_string).collect::<serde_json::Result<Vec<_>>>()?;
    align_core::data::prep::write_lines(path, lines.iter().map(String::as_str))
        .with_context(|| format!("--output {}", path.display()))?;
    Ok(())
}

fn cell(m: &Option<MeanStderr>) -> String {
    match m {
        None => "-".into(),
        Some(m) => match m.stderr {
            Some(se) => format!("{:.4} ± {:.4}", m.mean, se),
            None => format!("{:.4}", m.mean),
        },
    }
}

fn print_table(r: &ChoiceReport) {
    println!("{:<32} {:>6} {:>17} {:>17} {:>17}", "subject", "items", "acc", "acc_norm", "exact_match");
    for s in r.subjects.iter().chain(std::iter::once(&r.overall)) {
        println!(
            "{:<32} {:>6} {:>17} {:>17} {:>17}",
            s.subject,
            s.items,
            cell(&s.acc),
            cell(&s.acc_norm),
            cell(&s.exact_match)
        );
    }
}
