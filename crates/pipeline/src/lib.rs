//! The pipeline runner: one TOML file chains stages (pretrain → sft → … → eval) in a run
//! directory with lineage. A stage whose config and inputs are unchanged is skipped; a changed
//! stage re-runs and what follows it becomes stale; an interrupted stage resumes from its last
//! checkpoint through the stage's own exact resume.
//!
//! Rooms: `spec` (the pipeline file), `lineage` (hashes and stage.json), `runner` (the walk over
//! the stages), `stages` (what each stage kind does).
mod lineage;
mod runner;
mod spec;
mod stages;

pub use align_runs::{StageKind, StageRecord, StageStatus, TrainSummary};
pub use lineage::{content_hash, tokenizer_hash};
pub use runner::{run, RunOptions, StageOutcome};
pub use spec::{Pipeline, StageSpec, TokenizerSource};
pub use stages::train_stage;
