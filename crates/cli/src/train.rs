//! `align train pretrain|sft|reward|dpo|ppo|grpo|rloo|reinforce-pp|kto|distill --config FILE.toml [--set key=value …] [--restart]`.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use align_core::train::config::LoadedConfig;
use align_pipeline::{train_stage, StageKind};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Stage {
    Pretrain,
    Sft,
    /// Reward model: scalar head + Bradley–Terry on preference pairs (`[reward]`).
    Reward,
    /// DPO and its variants on preference pairs (`[dpo]`).
    Dpo,
    /// PPO on prompts with a reward model (`[ppo]`).
    Ppo,
    /// GRPO on prompts: groups of completions, rewards from a reward model, rules or a command (`[grpo]`).
    Grpo,
    /// RLOO: GRPO's step with the leave-one-out baseline (`[rloo]`).
    Rloo,
    /// REINFORCE++: GRPO's step with global-batch normalised advantages (`[reinforce_pp]`).
    #[value(name = "reinforce-pp", alias = "reinforce_pp")]
    ReinforcePp,
    /// KTO on unpaired desirable/undesirable completions or split preference pairs (`[kto]`).
    Kto,
    /// Knowledge distillation from a teacher model on SFT data, optionally on-policy (`[distill]`).
    Distill,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Which stage to train.
    pub stage: Stage,
    /// The stage's config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override any key, e.g. --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Start over instead of resuming from the newest checkpoint in output_dir.
    #[arg(long)]
    pub restart: bool,
    /// Stop (as if interrupted) after this many steps (PPO: iterations); the run resumes from there.
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

impl Stage {
    /// The stage kind of the one registry (align-runs), which the pipeline runs too.
    fn kind(self) -> StageKind {
        match self {
            Stage::Pretrain => StageKind::Pretrain,
            Stage::Sft => StageKind::Sft,
            Stage::Reward => StageKind::Reward,
            Stage::Dpo => StageKind::Dpo,
            Stage::Ppo => StageKind::Ppo,
            Stage::Grpo => StageKind::Grpo,
            Stage::Rloo => StageKind::Rloo,
            Stage::ReinforcePp => StageKind::ReinforcePp,
            Stage::Kto => StageKind::Kto,
            Stage::Distill => StageKind::Distill,
        }
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    crate::existing(&args.config, "config file")?;
    let kind = args.stage.kind();
    let section = kind.as_str();
    let cfg = LoadedConfig::load(&args.config, &args.overrides, section)?;
    let summary = train_stage(kind, &cfg, args.restart, args.stop_after)?;
    if !align_core::dist::world().is_main() {
        return Ok(()); // rank 0 reports the job
    }
    eprintln!(
        "{section}: {} ({} of {} steps, last loss {}, eval loss {}){}",
        summary.stop_reason,
        summary.steps,
        summary.total_steps,
        summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.eval_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.final_dir.as_ref().map_or(String::new(), |d| format!(" → {}", d.display()))
    );
    Ok(())
}
