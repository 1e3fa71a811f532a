//! `align run PIPELINE.toml [--from STAGE] [--only STAGE] [--restart] [--set stage.NAME.key=…]`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use align_pipeline::{run as run_pipeline, Pipeline, RunOptions, StageOutcome};

#[derive(Args)]
pub struct RunArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Start at this stage (earlier ones are used as they are).
    #[arg(long)]
    pub from: Option<String>,
    /// Run only this stage.
    #[arg(long, conflicts_with = "from")]
    pub only: Option<String>,
    /// Re-run the selected stages from scratch.
    #[arg(long)]
    pub restart: bool,
    /// Override a key: stage.NAME.train.lr=1e-4, defaults.seed=3, pipeline.run_dir=… (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Only validate the pipeline (keys, stage references, data files, stage configs) and exit.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: RunArgs) -> Result<()> {
    crate::existing(&args.pipeline, "pipeline file")?;
    let p = Pipeline::load(&args.pipeline, &args.overrides)?;
    if args.check {
        let stages: Vec<String> = p.stages.iter().map(|s| format!("{} ({})", s.name, s.kind)).collect();
        println!("{}: valid — {} stages: {}", args.pipeline.display(), stages.len(), stages.join(" → "));
        return Ok(());
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let outcomes = run_pipeline(&p, &RunOptions { from: args.from, only: args.only, restart: args.restart, command })?;
    if !align_core::dist::world().is_main() {
        return Ok(()); // rank 0 reports the run
    }
    for (name, o) in outcomes {
        let what = match o {
            StageOutcome::Ran => "ran",
            StageOutcome::Skipped => "up to date (skipped)",
            StageOutcome::NotSelected => "not selected",
        };
        eprintln!("{name:>12}: {what}");
    }
    eprintln!("run directory: {}", p.run_dir.display());
    Ok(())
}
