//! The one training loop every stage runs. A stage hands it a [`TrainStep`] — what one optimizer
//! step does (a supervised objective's accumulated micro-batches, or a PPO iteration), which
//! models and optimizers it owns and what state it adds to `train_state/` — and the loop owns
//! the rest: the step count and LR schedule, seeding, the data cursor, the non-finite guard,
//! evaluation, early stopping (with `best/`), metrics, and checkpoints with exact resume,
//! `final/` and `train_summary.json`. The supervised stages (PT, SFT, RM, DPO, KTO,
//! distillation) are one [`SupervisedStep`] over their [`Objective`].
//! Exactness relies on libtorch's process-global random generator, reseeded every step: run one
//! training per process (or serialise runs that draw random numbers).
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::Tensor;

use align_runs::files::{BEST, CHECKPOINT_PREFIX, FINAL, LOCK, OUTPUT_LEDGER, RUN_OUTPUTS, TRAIN_STATE};
pub use align_runs::files::{COMPLETE_MARKER, METRICS, SAMPLES, SUMMARY};
use align_runs::metrics;
pub use align_runs::TrainSummary;

use crate::hf::checkpoint::save_tensors;
use crate::hf::folder::{folder_manifest, verify_manifest, write_file_atomic, write_folder, FolderLock, Manifest};
use crate::model::recompute;
use crate::peft::lora::{loraplus_lr_scale, LoraConfig};
use crate::train::config::{RunFingerprint, TrainSection};
use crate::train::optim::{learning_rate, AdamW};
use crate::train::phases;
use crate::train::plan::{human_bytes, MemoryPlan};

/// Which part of the data a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

/// What one micro-batch's forward pass returns.
pub struct MicroBatch {
    /// Loss summed over the batch's units (differentiable when training).
    pub loss_sum: Tensor,
    /// Tokens processed (for throughput).
    pub tokens: usize,
    /// Extra metrics, each summed over units (the loop divides by the units).
    pub metrics: Vec<(String, f64)>,
    /// Metrics of `metrics` that are means over some other count (KTO's `rewards/chosen` over
    /// the desirable examples only): the count in this micro-batch. The loop divides their sums
    /// by these counts, summed like the metrics, and leaves out a metric whose count is 0.
    pub metric_counts: Vec<(String, f64)>,
}

impl MicroBatch {
    /// A micro-batch whose metrics are all means over the units.
    pub fn new(loss_sum: Tensor, tokens: usize, metrics: Vec<(String, f64)>) -> Self {
        MicroBatch { loss_sum, tokens, metrics, metric_counts: Vec::new() }
    }
}

/// Metric sums and counts of micro-batches.
#[derive(Default)]
struct MetricSums {
    sums: BTreeMap<String, f64>,
    counts: BTreeMap<String, f64>,
}

impl MetricSums {
    fn add(&mut self, mb: MicroBatch) {
        for (k, v) in mb.metrics {
            *self.sums.entry(k).or_default() += v;
        }
        for (k, v) in mb.metric_counts {
            *self.counts.entry(k).or_default() += v;
        }
    }

    /// Each metric's mean: over its own count when it has one, else over `units`.
    fn means(self, units: f64) -> impl Iterator<Item = (String, f64)> {
        let counts = self.counts;
        self.sums.into_iter().filter_map(move |(k, v)| match counts.get(&k) {
            Some(&n) if n > 0.0 => Some((k, v / n)),
            Some(_) => None,
            None => Some((k, v / units)),
        })
    }
}

/// A supervised stage's data and objective.
pub trait Objective {
    fn len(&self, split: Split) -> usize;
    /// Loss units of one example: label tokens for language modelling, 1 for a preference pair.
    /// A step's loss is the sum over its micro-batches divided by the units of all of them.
    fn units(&self, split: Split, example: usize) -> f64;
    /// Runs one micro-batch of `examples`.
    fn forward(&mut self, split: Split, examples: &[usize]) -> Result<MicroBatch>;
}

/// How a stage's trainable weights are written and read back.
pub trait ModelState {
    /// Writes the weights as a loadable folder (HF model, or PEFT adapter) into `dir`.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Loads weights saved by `save` back into the live model.
    fn restore(&self, dir: &Path) -> Result<()>;
    /// Switches dropout on (training) or off (evaluation).
    fn set_training(&self, _on: bool) {}
    /// The memory plan of training this model with `settings` ([`crate::train::plan`]), when the
    /// model can make one.
    fn memory_plan(&self, _settings: &TrainSection) -> Result<Option<MemoryPlan>> {
        Ok(None)
    }
    /// The LoRA the model trains, when it trains one.
    fn lora_config(&self) -> Option<&LoraConfig> {
        None
    }
}

/// Where the loop is when it asks for a step.
#[derive(Debug, Clone, Copy)]
pub struct StepContext {
    /// Steps done before this one (0-based index of this step).
    pub step: u64,
    pub total_steps: u64,
    /// The learning rate of this step (the schedule's value).
    pub lr: f64,
    /// Examples consumed before this step: the cursor into the seeded stream of
    /// [`stream_indices`] over the step's examples.
    pub examples_consumed: u64,
}

/// Why a step asks the loop to stop.
#[derive(Debug, Clone)]
pub struct StopRequest {
    /// Recorded as the summary's `stop_reason`.
    pub reason: String,
    /// Stop with an error (after the summary is written) instead of a normal, incomplete end.
    pub fail: bool,
}

/// What one step did, for the loop.
#[derive(Debug, Default)]
pub struct StepReport {
    /// The step's loss, logged as `loss`.
    pub loss: Option<f64>,
    /// The step's metrics, in the order they are logged.
    pub metrics: Vec<(String, f64)>,
    /// Examples of the data stream this step consumed.
    pub examples: u64,
    /// Tokens processed (throughput and `tokens_seen`).
    pub tokens: u64,
    /// False when a non-finite loss, score or gradient made the step skip its update.
    pub applied: bool,
    /// A short progress message (`loss 1.234`, `score 0.3 kl 1.2`).
    pub progress: String,
    pub stop: Option<StopRequest>,
}

/// Mean loss and metrics of an evaluation.
pub type Evaluation = (f64, BTreeMap<String, f64>);

/// One optimizer step of a stage: the only thing a stage hands the loop.
pub trait TrainStep {
    /// What a step is called in logs ("step", "iteration").
    fn unit(&self) -> &'static str {
        "step"
    }
    /// Examples in one epoch of the training data.
    fn examples(&self) -> usize;
    /// Examples one step consumes.
    fn examples_per_step(&self) -> usize;
    /// Runs one step.
    fn step(&mut self, at: &StepContext) -> Result<StepReport>;
    /// The optimizers the step owns, by name (each saved as `train_state/NAME.safetensors`).
    fn optimizers(&self) -> Vec<(&'static str, &AdamW)>;
    fn optimizers_mut(&mut self) -> Vec<(&'static str, &mut AdamW)>;
    /// Writes the trained model(s) as loadable folders into `dir` (a checkpoint, `final/`, `best/`).
    fn save(&self, dir: &Path) -> Result<()>;
    /// Loads what `save` wrote back into the live models.
    fn restore(&self, dir: &Path) -> Result<()>;
    /// The step's own resume state (saved in `train_state/state.json` under `stage`).
    fn state(&self) -> Result<Value> {
        Ok(Value::Null)
    }
    fn load_state(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
    /// True when the stage has validation data to evaluate.
    fn has_validation(&self) -> bool {
        false
    }
    /// The memory plan of a step ([`crate::train::plan`]); logged at the start, its total
    /// recorded in `train_summary.json` next to the measured peak. None where no plan is made
    /// (PPO's four models).
    fn memory_plan(&self) -> Result<Option<MemoryPlan>> {
        Ok(None)
    }
    /// Mean loss and metrics over the validation data.
    fn evaluate(&mut self) -> Result<Evaluation> {
        bail!("this stage has no validation data")
    }
}

/// The loop's inputs besides the step.
pub struct TrainRun<'a> {
    pub settings: &'a TrainSection,
    pub output_dir: &'a Path,
    /// The config and data this run trains on ([`LoadedConfig::fingerprint`]); a checkpoint of
    /// a different one is not resumed.
    ///
    /// [`LoadedConfig::fingerprint`]: crate::train::config::LoadedConfig::fingerprint
    pub fingerprint: &'a RunFingerprint,
    /// Start over instead of resuming from the newest checkpoint.
    pub restart: bool,
    /// Stop (as if interrupted) once this step is reached; for tests and `--stop-after`.
    pub stop_after: Option<u64>,
}

/// Persisted with every checkpoint; everything the loop needs to continue exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LoopState {
    pub step: u64,
    pub total_steps: u64,
    pub examples_consumed: u64,
    pub tokens_seen: u64,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub evals_without_improvement: u64,
    pub nonfinite_in_row: u64,
    pub nonfinite_total: u64,
    /// The config hash, the resolved config and the data files' hashes of the run.
    #[serde(flatten)]
    pub fingerprint: RunFingerprint,
    pub elapsed_seconds: f64,
    /// Updates each optimizer applied (Adam's bias-correction counts).
    pub optimizer_steps: BTreeMap<String, u64>,
    /// The step's own state ([`TrainStep::state`]).
    pub stage: Value,
}

impl LoopState {
    /// Refuses counters no run can have written (an edited or corrupt `state.json` at `path`, read
    /// from the folder of step `folder_step`): the error names the field and what was expected.
    /// Optimizer update counts are not bounded by the step (a PPO iteration makes many updates).
    pub fn check(&self, path: &Path, folder_step: u64) -> Result<()> {
        let fail = |what: String| Err(anyhow!("{}: {what}", path.display()));
        let step = self.step;
        if step != folder_step {
            return fail(format!(
                "field 'step': {step}, but the folder is checkpoint-{folder_step} (expected {folder_step})"
            ));
        }
        if step > self.total_steps {
            return fail(format!("field 'step': {step} (expected at most total_steps {})", self.total_steps));
        }
        if self.nonfinite_total > step {
            return fail(format!("field 'nonfinite_total': {} (expected at most step {step})", self.nonfinite_total));
        }
        if self.nonfinite_in_row > self.nonfinite_total {
            return fail(format!(
                "field 'nonfinite_in_row': {} (expected at most nonfinite_total {})",
                self.nonfinite_in_row, self.nonfinite_total
            ));
        }
        if let Some(best) = self.best_step.filter(|&b| b > step) {
            return fail(format!("field 'best_step': {best} (expected at most step {step})"));
        }
        if let Some(loss) = self.best_eval_loss.filter(|l| !l.is_finite()) {
            return fail(format!("field 'best_eval_loss': {loss} (expected a finite number)"));
        }
        if !(self.elapsed_seconds.is_finite() && self.elapsed_seconds >= 0.0) {
            return fail(format!("field 'elapsed_seconds': {} (expected a non-negative number)", self.elapsed_seconds));
        }
        Ok(())
    }
}

/// A seeded permutation of `0..n` for one epoch (splitmix64 + Fisher–Yates): the data order is a
/// pure function of (seed, epoch), so the data cursor is just a count of examples consumed.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The RNG seed of (0-based) step `step`: the loop seeds torch's generator with it before each
/// step, so a step's random draws do not depend on what ran before it (exact resume).
pub fn step_seed(seed: u64, step: u64) -> i64 {
    (seed as i64).wrapping_add(step as i64)
}

/// Items `start .. start + count` of the endless seeded stream over `0..n` that concatenates
/// `epoch_order(n, seed, 0)`, `epoch_order(n, seed, 1)`, …: the data cursor of a run is just
/// `start`, the count of items consumed.
pub fn stream_indices(n: usize, seed: u64, start: u64, count: usize) -> Vec<usize> {
    let mut order: Option<(u64, Vec<usize>)> = None;
    (0..count as u64)
        .map(|k| {
            let pos = start + k;
            let epoch = pos / n as u64;
            if order.as_ref().map(|o| o.0) != Some(epoch) {
                order = Some((epoch, epoch_order(n, seed, epoch)));
            }
            order.as_ref().map(|o| o.1[(pos % n as u64) as usize]).unwrap_or(0)
        })
        .collect()
}

/// Complete checkpoints under `output_dir`, oldest first.
pub fn complete_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            e.path().join(COMPLETE_MARKER).is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Reads `train_state/state.json` of a checkpoint folder (the loop's, or a stage's own state).
pub fn read_state<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join(TRAIN_STATE).join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}: {e}", path.display(), e.line()))
}

/// Keeps the metric lines of steps ≤ `step` (a resumed run rewrites what came after).
pub fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_file_atomic(path, out.as_bytes())
}

/// `metrics.jsonl`, one JSON object per line, flushed after every line.
pub struct MetricsLog {
    /// None on the ranks of a data-parallel job other than rank 0 (which writes the log).
    file: Option<std::fs::File>,
}

impl MetricsLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(MetricsLog { file: Some(file) })
    }
    /// A log that writes nothing (the other ranks of a data-parallel job).
    pub fn discard() -> Self {
        MetricsLog { file: None }
    }
    pub fn write(&mut self, v: &Value) -> Result<()> {
        if let Some(file) = &mut self.file {
            writeln!(file, "{v}")?;
            file.flush()?;
        }
        Ok(())
    }
}

/// The training run's record of the entries it wrote into its output folder
/// ([`OUTPUT_LEDGER`]): `--restart` removes only what it lists.
pub struct OutputLedger {
    path: PathBuf,
    written: std::collections::BTreeSet<String>,
}

impl OutputLedger {
    fn load(out: &Path) -> Result<Self> {
        let path = out.join(OUTPUT_LEDGER);
        let written = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| anyhow!("{}:{}: {e} (the run's record of its files)", path.display(), e.line()))?;
                v.get("written")
                    .and_then(Value::as_array)
                    .ok_or_else(|| anyhow!("{}: field 'written': expected a list of names", path.display()))?
                    .iter()
                    .map(|n| {
                        n.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| anyhow!("{}: field 'written': expected names", path.display()))
                    })
                    .collect::<Result<_>>()?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(anyhow!("{}: cannot read: {e}", path.display())),
        };
        Ok(OutputLedger { path, written })
    }

    fn save(&self) -> Result<()> {
        write_file_atomic(
            &self.path,
            (serde_json::to_string_pretty(&json!({"written": self.written}))? + "\n").as_bytes(),
        )
    }

    /// Records `name` before it is written, so that a crash never leaves an entry it does not list.
    pub fn add(&mut self, name: &str) -> Result<()> {
        if self.written.insert(name.to_string()) {
            self.save()?;
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<()> {
        if self.written.remove(name) {
            self.save()?;
        }
        Ok(())
    }
}

/// True for names a training run gives what it writes: checkpoints and [`RUN_OUTPUTS`].
fn named_like_ours(name: &str) -> bool {
    name.starts_with(CHECKPOINT_PREFIX) || RUN_OUTPUTS.contains(&name)
}

/// A temporary or set-aside entry a crash left behind (`.checkpoint-4.tmp-123`, `.final.old-9`,
/// `.metrics.jsonl.tmp-7`) of an entry named like ours.
fn half_written(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else { return false };
    [".tmp-", ".old-"].iter().any(|mark| {
        rest.rfind(mark).is_some_and(|at| {
            let base = &rest[..at];
            named_like_ours(base) || base == OUTPUT_LEDGER.trim_start_matches('.')
        })
    })
}

/// Creates `out` and removes what a crash left half-written; with `restart` removes the entries
/// the run's ledger lists (checkpoints, metrics, summary, samples, `final/`, `best/`) and nothing
/// else. An entry named like a run's output that the ledger does not list was not written by this
/// run: it is refused, never resumed from or deleted.
pub fn prepare_output_dir(out: &Path, restart: bool) -> Result<OutputLedger> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let had_ledger = out.join(OUTPUT_LEDGER).is_file();
    let mut ledger = OutputLedger::load(out)?;
    if !had_ledger {
        adopt_older_outputs(out, &mut ledger)?;
    }
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(out)?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if half_written(&name) {
            if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }
                .with_context(|| format!("{}: cannot remove", path.display()))?;
        } else if named_like_ours(&name) && !ledger.written.contains(&name) {
            foreign.push(name);
        }
    }
    foreign.sort();
    if let Some(first) = foreign.first() {
        bail!(
            "{}: holds '{first}'{}, which this folder's run record ({OUTPUT_LEDGER}) does not list: it was not written by a run here (or by an older align) and is neither resumed from nor deleted — move it away, or choose another output_dir",
            out.display(),
            if foreign.len() > 1 { format!(" and {} more", foreign.len() - 1) } else { String::new() }
        );
    }
    if restart {
        for name in ledger.written.clone() {
            let path = out.join(&name);
            if path.is_dir() {
                std::fs::remove_dir_all(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
            } else if path.exists() {
                std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
            }
            ledger.remove(&name)?;
        }
    }
    Ok(ledger)
}

/// A folder an older align trained into has no ledger: its entries are adopted when they carry
/// align's own proof — `checkpoint-N` folders with a COMPLETE marker of step N, and the run's
/// other outputs when there is such a checkpoint or a `train_summary.json` that reads as one.
/// Anything else named like ours stays foreign (refused, never deleted).
fn adopt_older_outputs(out: &Path, ledger: &mut OutputLedger) -> Result<()> {
    let checkpoints: Vec<String> = complete_checkpoints(out)
        .into_iter()
        .filter(|(step, dir)| read_marker(dir).is_ok_and(|m| m.step == *step))
        .filter_map(|(_, dir)| dir.file_name().map(|n| n.to_string_lossy().to_string()))
        .collect();
    let summary_reads = std::fs::read_to_string(out.join(SUMMARY))
        .ok()
        .is_some_and(|t| serde_json::from_str::<TrainSummary>(&t).is_ok_and(|s| s.total_steps > 0));
    let mut adopted = checkpoints.clone();
    if !checkpoints.is_empty() || summary_reads {
        adopted.extend(RUN_OUTPUTS.iter().filter(|n| out.join(n).exists()).map(|n| n.to_string()));
    }
    for name in &adopted {
        ledger.add(name)?;
    }
    if !adopted.is_empty() {
        tracing::warn!(
            "{}: no run record ({OUTPUT_LEDGER}): adopted {} entries an older align wrote ({})",
            out.display(),
            adopted.len(),
            adopted.join(", ")
        );
    }
    Ok(())
}

/// Test hooks, compiled only with the `fault-injection` feature (never into the release binary
/// users run): `ALIGN_TEST_STEP_DELAY_MS` slows every step (or PPO iteration) down so a test can
/// kill the process mid-run; `ALIGN_TEST_CRASH_IN_SAVE=STEP` aborts while checkpoint STEP is
/// half-written, as a SIGKILL would.
#[cfg(feature = "fault-injection")]
mod fault_injection {
    pub fn step_delay() {
        if let Some(ms) = std::env::var("ALIGN_TEST_STEP_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }

    pub fn crash_in_save(step: u64) {
        if std::env::var("ALIGN_TEST_CRASH_IN_SAVE").ok().and_then(|v| v.parse::<u64>().ok()) == Some(step) {
            std::process::abort();
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
mod fault_injection {
    pub fn step_delay() {}
    pub fn crash_in_save(_step: u64) {}
}

/// What a checkpoint's COMPLETE marker holds: its step and the size and SHA-256 of every file.
#[derive(Debug, Serialize, Deserialize)]
struct CompleteMarker {
    step: u64,
    files: Manifest,
}

/// Reads a checkpoint's COMPLETE marker; the marker of an older align holds only the step (its
/// manifest is then empty).
fn read_marker(dir: &Path) -> Result<CompleteMarker> {
    let path = dir.join(COMPLETE_MARKER);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    if let Ok(step) = text.trim().parse::<u64>() {
        return Ok(CompleteMarker { step, files: Manifest::new() });
    }
    serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}: {e}", path.display(), e.line()))
}

/// Checks a checkpoint's files against its COMPLETE marker (one of an older align has no
/// manifest: only its step is checked).
fn verify_checkpoint(dir: &Path, step: u64) -> Result<()> {
    let marker = read_marker(dir)?;
    if marker.step != step {
        let path = dir.join(COMPLETE_MARKER);
        bail!("{}: records step {}, but the folder is named for step {step}", path.display(), marker.step);
    }
    verify_manifest(dir, &marker.files)
}

/// Writes `OUTPUT/checkpoint-STEP` through a temporary folder: `fill` writes the model(s) and
/// `train_state/`, then the COMPLETE marker (the size and SHA-256 of every file) goes in, all of it
/// is fsync'd and the folder renamed into place; only then are all but the newest `keep` complete
/// checkpoints removed (0 = keep all).
fn write_checkpoint(
    out: &Path,
    ledger: &mut OutputLedger,
    step: u64,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = format!("{CHECKPOINT_PREFIX}{step}");
    ledger.add(&name)?;
    write_folder(&out.join(&name), |tmp| {
        fill(tmp)?;
        fault_injection::crash_in_save(step);
        let marker = CompleteMarker { step, files: folder_manifest(tmp, Some(COMPLETE_MARKER))? };
        std::fs::write(tmp.join(COMPLETE_MARKER), serde_json::to_string_pretty(&marker)? + "\n")?;
        Ok(())
    })?;
    if keep > 0 {
        let all = complete_checkpoints(out);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).with_context(|| format!("{}: cannot remove", old.display()))?;
            if let Some(n) = old.file_name() {
                ledger.remove(&n.to_string_lossy())?;
            }
        }
    }
    Ok(())
}

/// Writes `train_state/` into a checkpoint folder: each optimizer's state as
/// `<name>.safetensors` and the loop's `state.json`.
fn write_train_state(dir: &Path, optimizers: &[(&str, BTreeMap<String, Tensor>)], state: &LoopState) -> Result<()> {
    let st = dir.join(TRAIN_STATE);
    std::fs::create_dir_all(&st)?;
    for (name, tensors) in optimizers {
        let sub = st.join(format!(".{name}"));
        std::fs::create_dir_all(&sub)?;
        save_tensors(tensors, &sub, None, usize::MAX)?;
        std::fs::rename(sub.join(crate::hf::checkpoint::SINGLE_FILE), st.join(format!("{name}.safetensors")))?;
        std::fs::remove_dir(&sub)?;
    }
    std::fs::write(st.join("state.json"), serde_json::to_string_pretty(state)? + "\n")?;
    Ok(())
}

/// Restores an optimizer written by [`write_train_state`] under `name`, with its step count.
fn read_optimizer_state(dir: &Path, name: &str, opt: &mut AdamW, steps: u64) -> Result<()> {
    let file = dir.join(TRAIN_STATE).join(format!("{name}.safetensors"));
    let device = opt.parameters().next().map(|p| p.1.device()).unwrap_or(tch::Device::Cpu);
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&file)
        .map_err(|e| anyhow!("{}: {e}", file.display()))?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_device(device)))
        .collect();
    opt.load_state(&tensors, steps).with_context(|| format!("{}", file.display()))
}

/// Clips the gradients of `opt` to `max_norm` (when > 0) given their global norm, then applies
/// one update with `lr`: the one clipping rule of every stage.
pub fn clip_and_step(opt: &mut AdamW, grad_norm: f64, max_norm: f64, lr: f64) -> Result<()> {
    phases::timed(phases::Phase::Optimizer, || {
        if max_norm > 0.0 && grad_norm > max_norm {
            opt.scale_grads(max_norm / (grad_norm + 1e-6))?;
        }
        opt.step(lr)
    })
}

/// Optimizer steps of a run: `max_steps`, or enough for `epochs` passes over `examples` at
/// `per_step` examples a step.
pub fn planned_steps(s: &TrainSection, examples: usize, per_step: usize) -> u64 {
    if s.max_steps > 0 {
        return s.max_steps;
    }
    ((s.epochs * examples as f64) / per_step.max(1) as f64).ceil().max(1.0) as u64
}

/// Reads a checkpoint for resuming: its `state.json` parsed and checked, its files checked
/// against the COMPLETE marker.
fn read_checkpoint(dir: &Path, step: u64) -> Result<LoopState> {
    // an impossible state names its field; then every file must be what was written
    let saved: LoopState = read_state(dir)?;
    saved.check(&dir.join(TRAIN_STATE).join("state.json"), step)?;
    verify_checkpoint(dir, step)?;
    Ok(saved)
}

/// Loads a checkpoint's weights, optimizer states and the step's own state into the live run.
fn restore_checkpoint(step: &mut dyn TrainStep, dir: &Path, saved: &LoopState) -> Result<()> {
    step.restore(dir).with_context(|| format!("{}: cannot restore the model", dir.display()))?;
    for (name, opt) in step.optimizers_mut() {
        let n = saved
            .optimizer_steps
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("{}: train_state/state.json: optimizer_steps lacks '{name}'", dir.display()))?;
        read_optimizer_state(dir, name, opt, n)?;
    }
    step.load_state(&saved.stage).with_context(|| format!("{}: train_state/state.json: field 'stage'", dir.display()))
}

/// Resumes from the newest checkpoint that loads: one whose files do not match what was written,
/// whose state does not parse or whose weights or optimizer state do not load is skipped with a
/// warning naming the file, for the next older one. A checkpoint of a different config or data
/// is an error (the run would silently continue something else). Returns the state resumed.
fn resume(out: &Path, run: &TrainRun, step: &mut dyn TrainStep) -> Result<Option<LoopState>> {
    let mut broken = Vec::new();
    for (at, dir) in complete_checkpoints(out).into_iter().rev() {
        let saved = match read_checkpoint(&dir, at) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!("{e:#}: this checkpoint is broken; trying the next older one");
                broken.push(format!("{e:#}"));
                continue;
            }
        };
        let changes = run.fingerprint.changes_since(&saved.fingerprint);
        if !changes.is_empty() {
            bail!(
                "{}: cannot resume: the config or data changed since this run started ({}); restore them, or start over with --restart",
                dir.display(),
                changes.join("; ")
            );
        }
        if let Err(e) = restore_checkpoint(step, &dir, &saved) {
            tracing::warn!("{e:#}: this checkpoint does not load; trying the next older one");
            broken.push(format!("{e:#}"));
            continue;
        }
        if !broken.is_empty() {
            tracing::warn!("resumed from {} after {} broken newer checkpoint(s)", dir.display(), broken.len());
        }
        return Ok(Some(saved));
    }
    if !broken.is_empty() {
        bail!("{}: no checkpoint could be loaded ({}); start over with --restart", out.display(), broken.join("; "));
    }
    Ok(None)
}

/// Runs (or resumes) training to the end; returns the summary. One process at a time writes an
/// output folder (a second one fails at once, naming the first one's PID).
pub fn train(run: TrainRun, step: &mut dyn TrainStep) -> Result<TrainSummary> {
    let s = run.settings;
    let out = run.output_dir;
    let unit = step.unit();
    // a data-parallel job: rank 0 writes the output folder, every rank reads its checkpoints
    let world = align_dist::world();
    let main = world.is_main();
    let _lock = if main { Some(FolderLock::acquire(out, LOCK)?) } else { None };
    let mut ledger = if main { Some(prepare_output_dir(out, run.restart)?) } else { None };
    world.barrier()?;
    let n_train = step.examples();
    if n_train == 0 {
        bail!("no training examples");
    }
    let per_step = step.examples_per_step();
    let plan = step.memory_plan()?;
    if world.size() > 1 {
        let state: usize = step.optimizers().iter().map(|(_, o)| o.state_bytes()).sum();
        tracing::info!(
            "rank {} of {}: optimizer state held on this rank {} (train.zero = {})",
            world.rank(),
            world.size(),
            human_bytes(state as u64),
            s.zero
        );
    }
    if let Some(p) = plan.as_ref().filter(|_| main) {
        tracing::info!(
            "memory plan: weights {}, gradients {}, optimizer {}, activations {}, logits {}, step scratch {}, runtime {}; total {}",
            human_bytes(p.weights),
            human_bytes(p.gradients),
            human_bytes(p.optimizer),
            human_bytes(p.activations),
            human_bytes(p.logits),
            human_bytes(p.step_scratch),
            human_bytes(p.runtime),
            human_bytes(p.total)
        );
    }
    let total = planned_steps(s, n_train, per_step);
    let warmup = (s.warmup_ratio * total as f64).round() as u64;
    let mut state = LoopState { total_steps: total, fingerprint: run.fingerprint.clone(), ..Default::default() };
    for name in RUN_OUTPUTS {
        if let Some(ledger) = &mut ledger {
            ledger.add(name)?;
        }
    }

    let mut saved_at = None;
    let resumed = resume(out, &run, step)?;
    world.agree("the checkpoint to resume from", resumed.as_ref().map_or(0, |r| r.step))?;
    if let Some(saved) = resumed {
        let at = saved.step;
        state = LoopState { total_steps: total, fingerprint: run.fingerprint.clone(), ..saved };
        for log in [METRICS, SAMPLES].into_iter().filter(|_| main) {
            truncate_metrics(&out.join(log), at)?;
        }
        saved_at = Some(at);
        tracing::info!(
            "resuming from {} ({unit} {at} of {total})",
            out.join(format!("{CHECKPOINT_PREFIX}{at}")).display()
        );
    } else {
        for log in [METRICS, SAMPLES].into_iter().filter(|_| main) {
            truncate_metrics(&out.join(log), 0)?;
        }
    }
    let mut metrics = if main { MetricsLog::open(&out.join(METRICS))? } else { MetricsLog::discard() };

    let bar = progress_bar(total, state.step, unit).filter(|_| main);
    let started = Instant::now();
    let elapsed_before = state.elapsed_seconds;
    let mut last_loss = None;
    let mut last_eval = None;
    let mut stop_reason = String::from("completed");
    let mut stop_request: Option<StopRequest> = None;
    let evaluates = step.has_validation() && s.eval_every > 0;
    let keeps_best = step.has_validation() && s.early_stopping_patience > 0;
    let mut early_stopped = false;

    while state.step < total {
        if run.stop_after.is_some_and(|stop| state.step >= stop) {
            stop_reason = format!("stopped after {unit} {}", state.step);
            break;
        }
        if phases::enabled() {
            // what ran between steps (evaluation, a checkpoint) is not this step's
            phases::synchronize();
            let _ = phases::take();
        }
        let step_started = Instant::now();
        fault_injection::step_delay();
        let lr = learning_rate(state.step, total, s.lr, warmup, s.schedule, s.min_lr_ratio);
        tch::manual_seed(step_seed(s.seed, state.step));
        let at = StepContext { step: state.step, total_steps: total, lr, examples_consumed: state.examples_consumed };
        let report = step.step(&at)?;
        if report.applied {
            state.nonfinite_in_row = 0;
        } else {
            state.nonfinite_in_row += 1;
            state.nonfinite_total += 1;
        }
        state.step += 1;
        state.examples_consumed += report.examples;
        state.tokens_seen += report.tokens;
        let timing = phases::enabled().then(|| {
            phases::synchronize();
            phases::take()
        });
        let secs = step_started.elapsed().as_secs_f64();
        let mut line = Map::new();
        line.insert(metrics::STEP.into(), json!(state.step));
        line.insert(metrics::EPOCH.into(), json!(state.examples_consumed as f64 / n_train as f64));
        if let Some(l) = report.loss {
            line.insert(metrics::LOSS.into(), json!(l));
        }
        line.insert(metrics::LR.into(), json!(lr));
        line.insert(metrics::TOKENS_PER_SECOND.into(), json!(report.tokens as f64 / secs.max(1e-9)));
        for (k, v) in &report.metrics {
            line.insert(k.clone(), json!(v));
        }
        if let Some(p) = timing {
            // the rest of the step — forward passes, losses, batches, reductions — is "forward"
            let rest = (secs - p.backward - p.optimizer - p.generation).max(0.0);
            for (k, v) in [
                (metrics::TIME_STEP, secs),
                (metrics::TIME_FORWARD, rest),
                (metrics::TIME_BACKWARD, p.backward),
                (metrics::TIME_OPTIMIZER, p.optimizer),
                (metrics::TIME_GENERATION, p.generation),
            ] {
                line.insert(k.into(), json!(v));
            }
            line.insert(metrics::TOKENS.into(), json!(report.tokens));
            line.insert(metrics::GENERATED_TOKENS.into(), json!(p.generated_tokens));
        }
        if !report.applied {
            line.insert(metrics::SKIPPED_NONFINITE.into(), json!(true));
        }
        metrics.write(&Value::Object(line))?;
        last_loss = report.loss.or(last_loss);
        if let Some(b) = &bar {
            b.set_position(state.step);
            b.set_message(report.progress.clone());
        } else if main && (state.step % s.log_every.max(1) == 0 || state.step == total) {
            tracing::info!(
                "{unit} {}/{total} {} lr {lr:.3e} · {:.0} tok/s",
                state.step,
                report.progress,
                report.tokens as f64 / secs.max(1e-9)
            );
        }
        if state.nonfinite_in_row >= s.max_nonfinite_steps.max(1) {
            bail!(
                "stopping: {} non-finite {unit}s in a row (non-finite loss, score or gradient; the last good checkpoint is kept; lower train.lr?)",
                state.nonfinite_in_row
            );
        }
        if let Some(stop) = report.stop {
            stop_reason = stop.reason.clone();
            stop_request = Some(stop);
            break;
        }

        if evaluates && state.step % s.eval_every == 0 {
            let e = step.evaluate()?;
            last_eval = Some(e.0);
            write_eval(&mut metrics, state.step, &e)?;
            if improves(e.0, state.best_eval_loss) {
                state.best_eval_loss = Some(e.0);
                state.best_step = Some(state.step);
                state.evals_without_improvement = 0;
                if keeps_best && main {
                    write_folder(&out.join(BEST), |tmp| step.save(tmp))?;
                }
            } else {
                if !e.0.is_finite() {
                    tracing::warn!("{unit} {}: eval loss {} is not finite; counted as no improvement", state.step, e.0);
                }
                state.evals_without_improvement += 1;
            }
        }
        early_stopped = s.early_stopping_patience > 0 && state.evals_without_improvement >= s.early_stopping_patience;
        let save_now = (s.save_every > 0 && state.step % s.save_every == 0) || state.step == total || early_stopped;
        if save_now {
            state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
            save_checkpoint(out, ledger.as_mut(), &mut state, step, s.save_total_limit)?;
            saved_at = Some(state.step);
        }
        if early_stopped {
            stop_reason = format!(
                "early stopping: eval loss did not improve for {} evaluations (best at step {})",
                state.evals_without_improvement,
                state.best_step.map_or("-".to_string(), |b| b.to_string())
            );
            tracing::info!("{stop_reason}; its weights are in {}", out.join(BEST).display());
            break;
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let completed = stop_request.is_none() && (state.step >= total || early_stopped);
    let mut final_dir = None;
    if completed {
        if step.has_validation() && !(evaluates && state.step % s.eval_every == 0) {
            let e = step.evaluate()?;
            last_eval = Some(e.0);
            write_eval(&mut metrics, state.step, &e)?;
        }
        if saved_at != Some(state.step) {
            state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
            save_checkpoint(out, ledger.as_mut(), &mut state, step, s.save_total_limit)?;
        }
        let dir = out.join(FINAL);
        if main {
            write_folder(&dir, |tmp| step.save(tmp))?;
        }
        final_dir = Some(dir);
    }
    let best_dir = Some(out.join(BEST)).filter(|d| keeps_best && d.is_dir());
    let summary = TrainSummary {
        steps: state.step,
        total_steps: total,
        completed,
        stop_reason,
        last_loss: last_loss.or_else(|| last_logged(out, metrics::LOSS)),
        eval_loss: last_eval.or_else(|| last_logged(out, metrics::EVAL_LOSS)),
        best_eval_loss: state.best_eval_loss,
        best_step: state.best_step,
        best_dir,
        nonfinite_steps: state.nonfinite_total,
        tokens_seen: state.tokens_seen,
        seconds: elapsed_before + started.elapsed().as_secs_f64(),
        final_dir,
        peak_rss_bytes: peak_rss_bytes(),
        planned_peak_bytes: plan.as_ref().map(|p| p.total),
    };
    if let Some(peak) = summary.peak_rss_bytes.filter(|_| !main) {
        tracing::info!("rank {} of {}: peak memory (resident): {}", world.rank(), world.size(), human_bytes(peak));
    }
    if let Some(peak) = summary.peak_rss_bytes.filter(|_| main) {
        match summary.planned_peak_bytes {
            Some(planned) => tracing::info!(
                "peak memory (resident): {} (planned {}, {:+.1} %)",
                human_bytes(peak),
                human_bytes(planned),
                (planned as f64 / peak as f64 - 1.0) * 100.0
            ),
            None => tracing::info!("peak memory (resident): {}", human_bytes(peak)),
        }
    }
    if main {
        write_file_atomic(&out.join(SUMMARY), (serde_json::to_string_pretty(&summary)? + "\n").as_bytes())?;
    }
    // the other ranks return once rank 0 has written final/ and the summary
    world.barrier()?;
    if let Some(stop) = stop_request.filter(|s| s.fail) {
        bail!("stopped after {unit} {}: {} (the last checkpoint is kept)", state.step, stop.reason);
    }
    Ok(summary)
}

/// The process's peak resident set size (`VmHWM` of `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The last value of `key` in `OUTPUT/metrics.jsonl`.
pub fn last_logged(out: &Path, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(out.join(METRICS)).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get(key).and_then(Value::as_f64))
}

fn write_eval(metrics: &mut MetricsLog, step: u64, e: &Evaluation) -> Result<()> {
    let mut line = json!({metrics::STEP: step, metrics::EVAL_LOSS: e.0});
    for (k, v) in &e.1 {
        line[format!("{}{k}", metrics::EVAL_PREFIX)] = json!(v);
    }
    tracing::info!("step {step} eval_loss {:.4}", e.0);
    metrics.write(&line)
}

/// True when an evaluation's loss is a new best: finite, and below the best so far (a NaN or
/// infinite loss is never a best, so it cannot disable early stopping).
pub fn improves(loss: f64, best: Option<f64>) -> bool {
    loss.is_finite() && best.is_none_or(|b| loss < b)
}

/// Writes a checkpoint (rank 0, which holds the ledger); every rank takes part in gathering
/// the sharded optimizer state first.
fn save_checkpoint(
    out: &Path,
    ledger: Option<&mut OutputLedger>,
    state: &mut LoopState,
    step: &dyn TrainStep,
    keep: usize,
) -> Result<()> {
    for (name, opt) in step.optimizers() {
        if !opt.all_finite()? {
            bail!("step {}: the weights of '{name}' are not finite; refusing to save a checkpoint", state.step);
        }
    }
    state.optimizer_steps = step.optimizers().into_iter().map(|(n, o)| (n.to_string(), o.steps)).collect();
    state.stage = step.state()?;
    let optimizers =
        step.optimizers().into_iter().map(|(n, o)| Ok((n, o.gathered_state()?))).collect::<Result<Vec<_>>>()?;
    let Some(ledger) = ledger else { return Ok(()) };
    write_checkpoint(out, ledger, state.step, keep, |tmp| {
        step.save(tmp)?;
        write_train_state(tmp, &optimizers, state)
    })
}

/// A supervised stage's step (PT, SFT, RM, DPO): the next `batch_size · grad_accum` examples of
/// the seeded epoch stream in micro-batches of `batch_size`, the loss normalised by the loss
/// units of all of them, one global-norm-clipped AdamW update (skipped when the loss or the
/// gradient is not finite).
pub struct SupervisedStep<'a> {
    objective: &'a mut dyn Objective,
    model: &'a dyn ModelState,
    opt: AdamW,
    settings: &'a TrainSection,
}

const OPTIMIZER: &str = "optimizer";

impl<'a> SupervisedStep<'a> {
    /// `params`: the trainable parameters by name, in a fixed order.
    pub fn new(
        objective: &'a mut dyn Objective,
        model: &'a dyn ModelState,
        params: Vec<(String, Tensor)>,
        settings: &'a TrainSection,
    ) -> Result<Self> {
        let opt = rank_optimizer(params, settings, model.lora_config())?;
        Ok(SupervisedStep { objective, model, opt, settings })
    }
}

/// The AdamW of this rank: in a data-parallel job ([`align_dist::world`]) one whose gradients
/// are summed over the ranks, its state sharded under ZeRO-`train.zero`; else a plain one.
/// `lora`: the trained model's LoRA, whose `loraplus_lr_ratio` (LoRA+) sets the learning rates
/// of `lora_B`.
pub fn rank_optimizer(params: Vec<(String, Tensor)>, s: &TrainSection, lora: Option<&LoraConfig>) -> Result<AdamW> {
    let mut opt = match align_dist::world().group() {
        Some(g) => AdamW::sharded(params, s.adamw(), g, s.zero)?,
        None => {
            if s.zero > 0 {
                tracing::info!("train.zero = {}: one process, nothing to shard", s.zero);
            }
            AdamW::new(params, s.adamw())?
        }
    };
    if let Some(config) = lora.filter(|c| c.loraplus_lr_ratio.is_some()) {
        opt.set_lr_scales(|name, param| loraplus_lr_scale(config, name, param));
    }
    Ok(opt)
}

/// This rank's share of a step's examples: the global list split into equal contiguous parts
/// in rank order.
pub fn rank_share<T>(global: &[T]) -> &[T] {
    let w = align_dist::world();
    let per = global.len() / w.size();
    &global[w.rank() * per..(w.rank() + 1) * per]
}

/// Sums a step's loss, token count and metric sums and counts over the ranks (in key order;
/// the ranks must have the same metrics).
fn reduce_step_sums(loss: &mut f64, tokens: &mut usize, sums: &mut MetricSums) -> Result<()> {
    let w = align_dist::world();
    if w.size() == 1 {
        return Ok(());
    }
    w.agree("the number of metrics of a step", sums.sums.len() as u64)?;
    w.agree("the number of counted metrics of a step", sums.counts.len() as u64)?;
    let mut xs = vec![*loss, *tokens as f64];
    xs.extend(sums.sums.values());
    xs.extend(sums.counts.values());
    w.sum_f64(&mut xs)?;
    *loss = xs[0];
    *tokens = xs[1] as usize;
    let mut rest = xs[2..].iter();
    for v in sums.sums.values_mut().chain(sums.counts.values_mut()) {
        *v = *rest.next().expect("one value per metric");
    }
    Ok(())
}

impl TrainStep for SupervisedStep<'_> {
    fn examples(&self) -> usize {
        self.objective.len(Split::Train)
    }

    /// The global batch: `batch_size · grad_accum` on each rank.
    fn examples_per_step(&self) -> usize {
        self.settings.batch_size * self.settings.grad_accum * align_dist::world().size()
    }

    fn step(&mut self, at: &StepContext) -> Result<StepReport> {
        let s = self.settings;
        let n = self.objective.len(Split::Train);
        let per_step = self.examples_per_step();
        let global = stream_indices(n, s.seed, at.examples_consumed, per_step);
        // every rank knows the units of the whole global batch: the loss is normalised by them,
        // so the summed gradients are the single-process gradient of the global batch
        let units: f64 = global.iter().map(|&e| self.objective.units(Split::Train, e)).sum::<f64>().max(1.0);
        let examples = rank_share(&global);
        self.model.set_training(true);
        recompute::discard();
        let mut loss_value = 0f64;
        let mut tokens = 0usize;
        let mut sums = MetricSums::default();
        for micro in examples.chunks(s.batch_size) {
            let mb = self.objective.forward(Split::Train, micro)?;
            let loss = mb.loss_sum.f_div_scalar(units)?;
            loss_value += loss.f_double_value(&[])?;
            recompute::backward(&loss)?;
            tokens += mb.tokens;
            sums.add(mb);
        }
        self.opt.reduce_grads()?;
        reduce_step_sums(&mut loss_value, &mut tokens, &mut sums)?;
        let grad_norm = self.opt.grad_norm()?;
        let applied = loss_value.is_finite() && grad_norm.is_finite();
        if applied {
            clip_and_step(&mut self.opt, grad_norm, s.max_grad_norm, at.lr)?;
        } else {
            tracing::warn!(
                "step {}: non-finite loss or gradient (loss {loss_value}, grad norm {grad_norm}); update skipped",
                at.step + 1
            );
        }
        self.opt.zero_grad();
        let mut metrics = vec![(metrics::GRAD_NORM.to_string(), grad_norm)];
        metrics.extend(sums.means(units));
        Ok(StepReport {
            loss: Some(loss_value),
            metrics,
            examples: per_step as u64,
            tokens: tokens as u64,
            applied,
            progress: format!("loss {loss_value:.4} grad_norm {grad_norm:.3}"),
            stop: None,
        })
    }

    fn optimizers(&self) -> Vec<(&'static str, &AdamW)> {
        vec![(OPTIMIZER, &self.opt)]
    }

    fn optimizers_mut(&mut self) -> Vec<(&'static str, &mut AdamW)> {
        vec![(OPTIMIZER, &mut self.opt)]
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.model.save(dir)
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        self.model.restore(dir)
    }

    fn has_validation(&self) -> bool {
        self.objective.len(Split::Validation) > 0
    }

    fn memory_plan(&self) -> Result<Option<MemoryPlan>> {
        self.model.memory_plan(self.settings)
    }

    fn evaluate(&mut self) -> Result<Evaluation> {
        evaluate(self.objective, self.model, self.settings.batch_size)
    }
}

/// Trains a supervised stage: [`train`] with a [`SupervisedStep`] over `objective`.
pub fn train_supervised(
    run: TrainRun,
    objective: &mut dyn Objective,
    model: &dyn ModelState,
    params: Vec<(String, Tensor)>,
) -> Result<TrainSummary> {
    let mut step = SupervisedStep::new(objective, model, params, run.settings)?;
    train(run, &mut step)
}

/// Mean loss (and metrics) over the validation split, without gradients or dropout.
pub fn evaluate(objective: &mut dyn Objective, model: &dyn ModelState, batch_size: usize) -> Result<Evaluation> {
    model.set_training(false);
    let n = objective.len(Split::Validation);
    let all: Vec<usize> = (0..n).collect();
    let units: f64 = all.iter().map(|&e| objective.units(Split::Validation, e)).sum::<f64>().max(1.0);
    let mut loss = 0f64;
    let mut sums = MetricSums::default();
    let _guard = tch::no_grad_guard();
    // ranks evaluate every world-th chunk and sum (all of them when there are fewer chunks)
    let w = align_dist::world();
    let chunks: Vec<&[usize]> = all.chunks(batch_size.max(1)).collect();
    let sharded = w.size() > 1 && chunks.len() >= w.size();
    for (i, chunk) in chunks.into_iter().enumerate() {
        if sharded && i % w.size() != w.rank() {
            continue;
        }
        let mb = objective.forward(Split::Validation, chunk)?;
        loss += mb.loss_sum.f_double_value(&[])?;
        sums.add(mb);
    }
    if sharded {
        let mut tokens = 0;
        reduce_step_sums(&mut loss, &mut tokens, &mut sums)?;
    }
    model.set_training(true);
    Ok((loss / units, sums.means(units).collect()))
}

/// A progress bar over `total` steps when stderr is a terminal (None otherwise: log lines instead).
fn progress_bar(total: u64, at: u64, unit: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit}s · {{elapsed}} elapsed · ETA {{eta}} · {{msg}}");
    let style =
        indicatif::ProgressStyle::with_template(&template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(at);
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 7, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 7, 0));
        assert_ne!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 8, 0));
    }

    /// Resume state is JSON: every f64 must read back bit-exactly (serde_json's float_roundtrip).
    #[test]
    fn state_floats_read_back_exactly() {
        for x in [0.049985717128823985f64, 0.1 + 0.2, 1e-300, 2.0f64.sqrt(), -7.123456789012345e-5] {
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x}");
        }
    }

    #[test]
    fn stream_continues_across_epochs_from_any_cursor() {
        let all = stream_indices(5, 3, 0, 12);
        assert_eq!(&all[..5], &epoch_order(5, 3, 0)[..]);
        assert_eq!(&all[5..10], &epoch_order(5, 3, 1)[..]);
        assert_eq!(stream_indices(5, 3, 7, 5), all[7..12].to_vec());
    }

    #[test]
    fn impossible_resume_counters_are_refused() {
        let ok = LoopState {
            step: 4,
            total_steps: 10,
            nonfinite_in_row: 1,
            nonfinite_total: 2,
            best_step: Some(4),
            best_eval_loss: Some(1.5),
            elapsed_seconds: 3.0,
            optimizer_steps: BTreeMap::from([("policy".to_string(), 40)]),
            ..Default::default()
        };
        let path = Path::new("out/checkpoint-4/train_state/state.json");
        ok.check(path, 4).unwrap();
        let err = |s: LoopState, folder: u64| s.check(path, folder).unwrap_err().to_string();
        let e = err(ok.clone(), 6);
        assert!(
            e.starts_with("out/checkpoint-4/train_state/state.json: field 'step'") && e.contains("checkpoint-6"),
            "{e}"
        );
        assert!(err(LoopState { step: 11, ..ok.clone() }, 11).contains("total_steps 10"));
        assert!(
            err(LoopState { nonfinite_total: 5, nonfinite_in_row: 0, ..ok.clone() }, 4).contains("'nonfinite_total'")
        );
        assert!(err(LoopState { nonfinite_in_row: 3, ..ok.clone() }, 4).contains("'nonfinite_in_row'"));
        assert!(err(LoopState { best_step: Some(5), ..ok.clone() }, 4).contains("'best_step': 5"));
        assert!(err(LoopState { best_eval_loss: Some(f64::INFINITY), ..ok.clone() }, 4).contains("'best_eval_loss'"));
        assert!(err(LoopState { elapsed_seconds: -1.0, ..ok.clone() }, 4).contains("'elapsed_seconds'"));
        assert!(err(LoopState { elapsed_seconds: f64::NAN, ..ok.clone() }, 4).contains("'elapsed_seconds'"));
    }

    #[test]
    fn total_steps_from_epochs() {
        let s = TrainSection { epochs: 2.0, ..Default::default() };
        assert_eq!(planned_steps(&s, 20, 8), 5);
        let s = TrainSection { max_steps: 7, ..Default::default() };
        assert_eq!(planned_steps(&s, 20, 8), 7);
    }
}
