//! The run record, defined once for the trainer, the pipeline and the report: what each file of a
//! run folder is called, the stage kinds and statuses, `train_summary.json` and `stage.json`, and
//! the metric names every stage logs. No libtorch here, so the report reads runs without it.
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// File and folder names inside a training output folder and a pipeline run folder.
pub mod files {
    /// One JSON object per optimizer step (and per evaluation) — `metrics.jsonl`.
    pub const METRICS: &str = "metrics.jsonl";
    /// What a finished (or stopped) run reports.
    pub const SUMMARY: &str = "train_summary.json";
    /// Sampled generations of an RL run (prompt, response, score).
    pub const SAMPLES: &str = "samples.jsonl";
    /// A stage's status and lineage, in `RUN_DIR/STAGE/`.
    pub const STAGE_RECORD: &str = "stage.json";
    /// A pipeline run's name and stage order, in `RUN_DIR/`.
    pub const PIPELINE_RECORD: &str = "pipeline.json";
    /// Marks a checkpoint folder as completely written.
    pub const COMPLETE_MARKER: &str = "COMPLETE";
    /// Beside a checkpoint's weights: optimizer state and `state.json`.
    pub const TRAIN_STATE: &str = "train_state";
    /// The last weights of a completed run.
    pub const FINAL: &str = "final";
    /// The weights of the best evaluation (early stopping).
    pub const BEST: &str = "best";
    /// `checkpoint-STEP` folders.
    pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
    /// What a training run may own in its output folder besides checkpoints (`--restart` removes
    /// those of them that [`OUTPUT_LEDGER`] lists).
    pub const RUN_OUTPUTS: &[&str] = &[METRICS, SUMMARY, SAMPLES, FINAL, BEST];
    /// The training run's record of every entry it wrote into its output folder: `--restart`
    /// removes only what it lists, and an entry named like ours that it does not list is refused.
    pub const OUTPUT_LEDGER: &str = ".align-outputs.json";
    /// The advisory lock (flock) of a folder one `align` process writes: an output folder or a
    /// pipeline run folder. It holds the writer's PID.
    pub const LOCK: &str = ".align.lock";
}

/// Metric names shared by every stage (a stage adds its own, with TRL's names where TRL has one).
pub mod metrics {
    pub const STEP: &str = "step";
    pub const EPOCH: &str = "epoch";
    pub const LOSS: &str = "loss";
    pub const LR: &str = "lr";
    pub const GRAD_NORM: &str = "grad_norm";
    pub const TOKENS_PER_SECOND: &str = "tokens_per_second";
    pub const EVAL_LOSS: &str = "eval_loss";
    /// Prefix of every evaluation metric (`eval_accuracy`, …).
    pub const EVAL_PREFIX: &str = "eval_";
    pub const SKIPPED_NONFINITE: &str = "skipped_nonfinite";
    // the split of a step, seconds (written only while phases are timed: `align bench train`)
    pub const TIME_STEP: &str = "time/step";
    pub const TIME_FORWARD: &str = "time/forward";
    pub const TIME_BACKWARD: &str = "time/backward";
    pub const TIME_OPTIMIZER: &str = "time/optimizer";
    pub const TIME_GENERATION: &str = "time/generation";
    /// Tokens the step trained on, and tokens it generated (timed runs only).
    pub const TOKENS: &str = "tokens";
    pub const GENERATED_TOKENS: &str = "generated_tokens";
    // PPO (TRL / OpenRLHF names)
    pub const KL: &str = "objective/kl";
    pub const SCORES: &str = "objective/scores";
    pub const RLHF_REWARD: &str = "objective/rlhf_reward";
    pub const ENTROPY: &str = "objective/entropy";
    pub const RESPONSE_LENGTH: &str = "response_length_mean";
    pub const EOS_RATE: &str = "eos_rate";
    pub const VF_LOSS: &str = "val/vf_loss";
    pub const POLICY_LOSS: &str = "loss/policy";
    // reward model / DPO
    pub const ACCURACY: &str = "accuracy";
    pub const MARGIN: &str = "margin";
    pub const REWARDS_ACCURACIES: &str = "rewards/accuracies";
    pub const REWARDS_MARGINS: &str = "rewards/margins";
}

/// What a stage does: the one registry of stage kinds, for `align train`, the pipeline and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    Tokenizer,
    Init,
    Pretrain,
    Sft,
    Reward,
    Dpo,
    Ppo,
    Grpo,
    Rloo,
    #[serde(rename = "reinforce_pp")]
    ReinforcePp,
    Eval,
    Kto,
    Distill,
}

impl StageKind {
    pub const ALL: [StageKind; 13] = [
        StageKind::Tokenizer,
        StageKind::Init,
        StageKind::Pretrain,
        StageKind::Sft,
        StageKind::Reward,
        StageKind::Dpo,
        StageKind::Ppo,
        StageKind::Grpo,
        StageKind::Rloo,
        StageKind::ReinforcePp,
        StageKind::Eval,
        StageKind::Kto,
        StageKind::Distill,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Tokenizer => "tokenizer",
            StageKind::Init => "init",
            StageKind::Pretrain => "pretrain",
            StageKind::Sft => "sft",
            StageKind::Reward => "reward",
            StageKind::Dpo => "dpo",
            StageKind::Ppo => "ppo",
            StageKind::Grpo => "grpo",
            StageKind::Rloo => "rloo",
            StageKind::ReinforcePp => "reinforce_pp",
            StageKind::Eval => "eval",
            StageKind::Kto => "kto",
            StageKind::Distill => "distill",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        StageKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kinds `align train KIND` runs (a training loop with checkpoints and metrics).
    pub fn trains(self) -> bool {
        matches!(
            self,
            StageKind::Pretrain
                | StageKind::Sft
                | StageKind::Reward
                | StageKind::Dpo
                | StageKind::Ppo
                | StageKind::Kto
                | StageKind::Distill
        ) || self.samples_groups()
    }

    /// GRPO, RLOO and REINFORCE++: one step that samples groups of completions per prompt and
    /// scores them with reward models, rules or a command.
    pub fn samples_groups(self) -> bool {
        matches!(self, StageKind::Grpo | StageKind::Rloo | StageKind::ReinforcePp)
    }

    /// Stages that make their output from files and record results rather than training
    /// metrics: tokenizer, init and eval stages.
    pub fn records_results(self) -> bool {
        matches!(self, StageKind::Tokenizer | StageKind::Init | StageKind::Eval)
    }

    /// The training kinds, in ladder order.
    pub fn training_kinds() -> Vec<StageKind> {
        StageKind::ALL.into_iter().filter(|k| k.trains()).collect()
    }

    /// `a, b, c` of the kinds given, for error messages.
    pub fn list(kinds: &[StageKind]) -> String {
        kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    #[default]
    Pending,
    Running,
    Done,
    Failed,
    Stale,
}

impl StageStatus {
    pub const ALL: [StageStatus; 5] =
        [StageStatus::Pending, StageStatus::Running, StageStatus::Done, StageStatus::Failed, StageStatus::Stale];

    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Running => "running",
            StageStatus::Done => "done",
            StageStatus::Failed => "failed",
            StageStatus::Stale => "stale",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        StageStatus::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for StageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `train_summary.json`: what a finished (or stopped) training run reports. Every field reads
/// with a default, so a summary written by an older trainer still reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSummary {
    pub steps: u64,
    pub total_steps: u64,
    pub completed: bool,
    pub stop_reason: String,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    /// The step whose evaluation was best (its weights are in `best/` when early stopping is on).
    pub best_step: Option<u64>,
    pub best_dir: Option<PathBuf>,
    pub nonfinite_steps: u64,
    pub tokens_seen: u64,
    pub seconds: f64,
    pub final_dir: Option<PathBuf>,
    /// The process's peak resident memory when the run ended (Linux `VmHWM`), in bytes; None
    /// where the system does not report it. On CUDA, device memory is not included.
    pub peak_rss_bytes: Option<u64>,
    /// The memory plan's total for the run (`align plan`; weights, gradients, optimizer state,
    /// activations, logits and the runtime), in bytes; None where no plan is made (PPO).
    #[serde(default)]
    pub planned_peak_bytes: Option<u64>,
}

/// `stage.json`: a pipeline stage's status and lineage. Every field but `kind` and `status`
/// reads with a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    #[serde(default)]
    pub name: String,
    pub kind: StageKind,
    pub status: StageStatus,
    #[serde(default)]
    pub stale_reason: Option<String>,
    #[serde(default)]
    pub config_hash: String,
    /// Hash over the config and every input (models, data, tokenizer): equal means up to date.
    #[serde(default)]
    pub input_hash: String,
    #[serde(default)]
    pub config: Value,
    #[serde(default)]
    pub inputs: Vec<Value>,
    #[serde(default)]
    pub data: Vec<Value>,
    #[serde(default)]
    pub tokenizer_hash: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub duration_seconds: Option<f64>,
    #[serde(default)]
    pub summary: Option<TrainSummary>,
    /// Whatever JSON the stage's evaluation produced.
    #[serde(default)]
    pub eval: Option<Value>,
    /// Content hash of what the stage produced (its `final/` folder), for the stages after it.
    #[serde(default)]
    pub output_hash: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub version: String,
}

impl StageRecord {
    /// A pending record of stage `name` of `kind`, every other field empty.
    pub fn new(name: &str, kind: StageKind) -> Self {
        StageRecord {
            name: name.to_string(),
            kind,
            status: StageStatus::Pending,
            stale_reason: None,
            config_hash: String::new(),
            input_hash: String::new(),
            config: Value::Null,
            inputs: Vec::new(),
            data: Vec::new(),
            tokenizer_hash: None,
            started_at: None,
            finished_at: None,
            duration_seconds: None,
            summary: None,
            eval: None,
            output_hash: None,
            error: None,
            command: String::new(),
            version: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_statuses_round_trip_through_their_names() {
        for k in StageKind::ALL {
            assert_eq!(StageKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), Value::String(k.as_str().into()));
        }
        for s in StageStatus::ALL {
            assert_eq!(StageStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(StageKind::parse("reinforce_pp"), Some(StageKind::ReinforcePp));
        assert_eq!(StageKind::parse("reinforcepp"), None);
        assert_eq!(
            StageKind::list(&StageKind::training_kinds()),
            "pretrain, sft, reward, dpo, ppo, grpo, rloo, reinforce_pp, kto, distill"
        );
    }

    #[test]
    fn an_older_summary_without_new_fields_reads() {
        let s: TrainSummary =
            serde_json::from_str(r#"{"steps": 3, "completed": true, "stop_reason": "completed"}"#).unwrap();
        assert_eq!((s.steps, s.completed, s.best_step), (3, true, None));
    }

    #[test]
    fn a_stage_record_round_trips_and_needs_kind_and_status() {
        let mut r = StageRecord::new("sft", StageKind::Sft);
        r.status = StageStatus::Done;
        let back: StageRecord = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(serde_json::from_str::<StageRecord>(r#"{"name": "x", "status": "done"}"#).is_err());
    }
}
