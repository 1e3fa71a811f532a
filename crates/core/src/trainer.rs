//! The one training loop every stage runs. A stage supplies an `Objective` (its batches and loss)
//! and a `ModelState` (how its weights are saved and restored); the loop does gradient
//! accumulation normalised by loss units (label tokens, pairs), clipping, the LR schedule, the
//! NaN guard, evaluation and early stopping, metrics, and checkpoints with exact resume.
//! Exactness relies on libtorch's process-global random generator, reseeded every step: run one
//! training per process (or serialise runs that draw random numbers).
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::Tensor;

use crate::checkpoint::{save_tensors, write_folder};
use crate::optim::{learning_rate, AdamW};
use crate::train_config::TrainSection;

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
}

/// A stage's data and objective.
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
}

/// The loop's inputs besides the stage.
pub struct TrainRun<'a> {
    pub settings: &'a TrainSection,
    pub output_dir: &'a Path,
    /// Trainable parameters by name, in a fixed order.
    pub params: Vec<(String, Tensor)>,
    pub config_hash: &'a str,
    /// Start over instead of resuming from the newest checkpoint.
    pub restart: bool,
    /// Stop (as if interrupted) once this step is reached; for tests and `--stop-after`.
    pub stop_after: Option<u64>,
}

/// Persisted with every checkpoint; everything the loop needs to continue exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    pub step: u64,
    pub total_steps: u64,
    pub examples_consumed: u64,
    pub tokens_seen: u64,
    pub best_eval_loss: Option<f64>,
    pub evals_without_improvement: u64,
    pub nonfinite_in_row: u64,
    pub nonfinite_total: u64,
    pub config_hash: String,
    pub elapsed_seconds: f64,
}

/// What a finished (or stopped) run reports; written to `OUTPUT/train_summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub total_steps: u64,
    pub completed: bool,
    pub stop_reason: String,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub nonfinite_steps: u64,
    pub tokens_seen: u64,
    pub seconds: f64,
    pub final_dir: Option<PathBuf>,
}

pub const COMPLETE_MARKER: &str = "COMPLETE";
const STATE_DIR: &str = "train_state";
pub const METRICS: &str = "metrics.jsonl";
pub const SUMMARY: &str = "train_summary.json";
/// Sampled rollouts of a PPO run (removed with the rest of a run on restart).
pub const SAMPLES: &str = "samples.jsonl";

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

/// Optimizer steps of a run: `max_steps`, or enough for `epochs` passes over `n` examples.
pub fn total_steps(s: &TrainSection, n: usize) -> u64 {
    if s.max_steps > 0 {
        return s.max_steps;
    }
    let per_step = (s.batch_size * s.grad_accum) as f64;
    ((s.epochs * n as f64) / per_step).ceil().max(1.0) as u64
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
    let path = dir.join(STATE_DIR).join("state.json");
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
    std::fs::write(path, out).with_context(|| format!("{}: cannot rewrite", path.display()))
}

/// `metrics.jsonl`, one JSON object per line, flushed after every line.
pub struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(MetricsLog { file })
    }
    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }
}

/// Creates `out`; with `restart` removes its checkpoints, final folder, metrics and summary; and
/// removes folders a crash left half-written (a checkpoint is only complete under its own name).
pub fn prepare_output_dir(out: &Path, restart: bool) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    for entry in std::fs::read_dir(out)?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        let half_written = name.starts_with(".checkpoint-") || name.starts_with(".final.");
        let previous_run = restart
            && (name.starts_with("checkpoint-")
                || name == "final"
                || name == METRICS
                || name == SUMMARY
                || name == SAMPLES);
        if half_written || previous_run {
            let path = entry.path();
            if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }
                .with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    Ok(())
}

/// Test hook: `ALIGN_TEST_STEP_DELAY_MS` slows every step (or PPO iteration) down so a test can
/// kill the process mid-run.
pub fn test_step_delay() {
    if let Some(ms) = std::env::var("ALIGN_TEST_STEP_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Writes `OUTPUT/checkpoint-STEP` through a temporary folder: `fill` writes the model(s) and
/// `train_state/`, then the COMPLETE marker goes in and the folder is renamed into place; only
/// the newest `keep` complete checkpoints are kept (0 = all).
pub fn write_checkpoint(out: &Path, step: u64, keep: usize, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = out.join(format!("checkpoint-{step}"));
    write_folder(&dir, |tmp| {
        fill(tmp)?;
        if std::env::var("ALIGN_TEST_CRASH_IN_SAVE").ok().and_then(|v| v.parse::<u64>().ok()) == Some(step) {
            // test hook: die in the middle of writing a checkpoint, as a SIGKILL would
            std::process::abort();
        }
        std::fs::write(tmp.join(COMPLETE_MARKER), format!("{step}\n"))?;
        Ok(())
    })?;
    if keep > 0 {
        let all = complete_checkpoints(out);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).with_context(|| format!("{}: cannot remove", old.display()))?;
        }
    }
    Ok(())
}

/// Writes `train_state/` into a checkpoint folder: each optimizer's state as
/// `<name>.safetensors` and the loop's `state.json`.
pub fn write_train_state<S: Serialize>(dir: &Path, optimizers: &[(&str, &AdamW)], state: &S) -> Result<()> {
    let st = dir.join(STATE_DIR);
    std::fs::create_dir_all(&st)?;
    for (name, opt) in optimizers {
        let sub = st.join(format!(".{name}"));
        std::fs::create_dir_all(&sub)?;
        save_tensors(&opt.state_tensors(), &sub, None, usize::MAX)?;
        std::fs::rename(sub.join(crate::checkpoint::SINGLE_FILE), st.join(format!("{name}.safetensors")))?;
        std::fs::remove_dir(&sub)?;
    }
    std::fs::write(st.join("state.json"), serde_json::to_string_pretty(state)? + "\n")?;
    Ok(())
}

/// Restores an optimizer written by [`write_train_state`] under `name`, with its step count.
pub fn read_optimizer_state(dir: &Path, name: &str, opt: &mut AdamW, steps: u64) -> Result<()> {
    let file = dir.join(STATE_DIR).join(format!("{name}.safetensors"));
    let device = opt.parameters().next().map(|p| p.1.device()).unwrap_or(tch::Device::Cpu);
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&file)
        .map_err(|e| anyhow!("{}: {e}", file.display()))?
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device)))
        .collect();
    opt.load_state(&tensors, steps).with_context(|| format!("{}", file.display()))
}

/// Runs (or resumes) training to the end; returns the summary.
pub fn train(run: TrainRun, objective: &mut dyn Objective, model: &dyn ModelState) -> Result<TrainSummary> {
    let s = run.settings;
    let out = run.output_dir;
    prepare_output_dir(out, run.restart)?;
    let n_train = objective.len(Split::Train);
    if n_train == 0 {
        bail!("no training examples");
    }
    let total = total_steps(s, n_train);
    let warmup = (s.warmup_ratio * total as f64).round() as u64;
    let mut opt = AdamW::new(run.params, s.adamw())?;
    let mut state = LoopState { total_steps: total, config_hash: run.config_hash.to_string(), ..Default::default() };

    if let Some((step, dir)) = complete_checkpoints(out).pop() {
        let saved: LoopState = read_state(&dir)?;
        if saved.config_hash != run.config_hash {
            tracing::warn!(
                "{}: resuming a run whose config has changed since (use --restart to start over)",
                dir.display()
            );
        }
        model.restore(&dir).with_context(|| format!("{}: cannot restore the model", dir.display()))?;
        read_optimizer_state(&dir, "optimizer", &mut opt, saved.step - saved.nonfinite_total)?;
        state = LoopState { total_steps: total, config_hash: run.config_hash.to_string(), ..saved };
        truncate_metrics(&out.join(METRICS), step)?;
        tracing::info!("resuming from {} (step {step} of {total})", dir.display());
    } else {
        truncate_metrics(&out.join(METRICS), 0)?;
    }
    let mut metrics = MetricsLog::open(&out.join(METRICS))?;

    let per_step = s.batch_size * s.grad_accum;
    let bar = progress_bar(total, state.step);
    let started = Instant::now();
    let elapsed_before = state.elapsed_seconds;
    let mut last_loss = None;
    let mut last_eval = None;
    let mut stop_reason = String::from("completed");
    let mut saved_at = complete_checkpoints(out).last().map(|c| c.0);
    let n_val = objective.len(Split::Validation);

    while state.step < total {
        if run.stop_after.is_some_and(|stop| state.step >= stop) {
            stop_reason = format!("stopped after step {}", state.step);
            break;
        }
        let step_started = Instant::now();
        test_step_delay();
        let lr = learning_rate(state.step, total, s.lr, warmup, s.schedule, s.min_lr_ratio);
        tch::manual_seed((s.seed as i64).wrapping_add(state.step as i64));
        // the examples of this step, continuing the seeded epoch stream
        let examples = stream_indices(n_train, s.seed, state.examples_consumed, per_step);
        let units: f64 = examples.iter().map(|&e| objective.units(Split::Train, e)).sum::<f64>().max(1.0);
        model.set_training(true);
        let mut loss_value = 0f64;
        let mut tokens = 0usize;
        let mut metric_sums: BTreeMap<String, f64> = BTreeMap::new();
        for micro in examples.chunks(s.batch_size) {
            let mb = objective.forward(Split::Train, micro)?;
            let loss = mb.loss_sum.f_div_scalar(units)?;
            loss_value += loss.f_double_value(&[])?;
            loss.f_backward()?;
            tokens += mb.tokens;
            for (k, v) in mb.metrics {
                *metric_sums.entry(k).or_default() += v;
            }
        }
        let grad_norm = opt.grad_norm()?;
        let finite = loss_value.is_finite() && grad_norm.is_finite();
        if finite {
            if s.max_grad_norm > 0.0 && grad_norm > s.max_grad_norm {
                opt.scale_grads(s.max_grad_norm / (grad_norm + 1e-6))?;
            }
            opt.step(lr)?;
            state.nonfinite_in_row = 0;
        } else {
            state.nonfinite_in_row += 1;
            state.nonfinite_total += 1;
            tracing::warn!(
                "step {}: non-finite loss or gradient (loss {loss_value}, grad norm {grad_norm}); update skipped",
                state.step + 1
            );
        }
        opt.zero_grad();
        state.step += 1;
        state.examples_consumed += per_step as u64;
        state.tokens_seen += tokens as u64;
        let secs = step_started.elapsed().as_secs_f64();
        let mut line = json!({
            "step": state.step,
            "epoch": state.examples_consumed as f64 / n_train as f64,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens as f64 / secs.max(1e-9),
        });
        for (k, v) in &metric_sums {
            line[k.as_str()] = json!(v / units);
        }
        if !finite {
            line["skipped_nonfinite"] = json!(true);
        }
        metrics.write(&line)?;
        last_loss = Some(loss_value);
        if let Some(b) = &bar {
            b.set_position(state.step);
            b.set_message(format!("loss {loss_value:.4} lr {lr:.2e}"));
        } else if state.step % s.log_every.max(1) == 0 || state.step == total {
            tracing::info!(
                "step {}/{total} loss {loss_value:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {:.0} tok/s",
                state.step,
                tokens as f64 / secs.max(1e-9)
            );
        }
        if state.nonfinite_in_row >= s.max_nonfinite_steps.max(1) {
            bail!(
                "stopping: {} non-finite steps in a row (last good checkpoint is kept; lower train.lr?)",
                state.nonfinite_in_row
            );
        }

        let eval_now = n_val > 0 && s.eval_every > 0 && state.step % s.eval_every == 0;
        if eval_now {
            let e = evaluate(objective, model, s.batch_size)?;
            last_eval = Some(e.0);
            write_eval(&mut metrics, state.step, &e)?;
            if state.best_eval_loss.is_none_or(|b| e.0 < b) {
                state.best_eval_loss = Some(e.0);
                state.evals_without_improvement = 0;
            } else {
                state.evals_without_improvement += 1;
            }
        }
        let early_stop = s.early_stopping_patience > 0 && state.evals_without_improvement >= s.early_stopping_patience;
        let save_now = (s.save_every > 0 && state.step % s.save_every == 0) || state.step == total || early_stop;
        if save_now {
            state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
            save_checkpoint(out, &state, &opt, model, s.save_total_limit)?;
            saved_at = Some(state.step);
        }
        if early_stop {
            stop_reason = format!(
                "early stopping: eval loss did not improve for {} evaluations",
                state.evals_without_improvement
            );
            break;
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let completed = state.step >= total || stop_reason.starts_with("early stopping");
    let mut final_dir = None;
    if completed {
        if n_val > 0 && !(s.eval_every > 0 && state.step % s.eval_every == 0) {
            let e = evaluate(objective, model, s.batch_size)?;
            last_eval = Some(e.0);
            write_eval(&mut metrics, state.step, &e)?;
        }
        if saved_at != Some(state.step) {
            state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
            save_checkpoint(out, &state, &opt, model, s.save_total_limit)?;
        }
        if !opt.all_finite()? {
            bail!("the final weights are not finite; nothing was saved as final");
        }
        let dir = out.join("final");
        write_folder(&dir, |tmp| model.save(tmp))?;
        final_dir = Some(dir);
    }
    let summary = TrainSummary {
        steps: state.step,
        total_steps: total,
        completed,
        stop_reason,
        last_loss: last_loss.or_else(|| last_logged(out, "loss")),
        eval_loss: last_eval.or_else(|| last_logged(out, "eval_loss")),
        best_eval_loss: state.best_eval_loss,
        nonfinite_steps: state.nonfinite_total,
        tokens_seen: state.tokens_seen,
        seconds: elapsed_before + started.elapsed().as_secs_f64(),
        final_dir,
    };
    std::fs::write(out.join(SUMMARY), serde_json::to_string_pretty(&summary)? + "\n")?;
    Ok(summary)
}

/// The last value of `key` in `OUTPUT/metrics.jsonl`.
pub fn last_logged(out: &Path, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(out.join(METRICS)).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get(key).and_then(Value::as_f64))
}

fn write_eval(metrics: &mut MetricsLog, step: u64, e: &(f64, BTreeMap<String, f64>)) -> Result<()> {
    let mut line = json!({"step": step, "eval_loss": e.0});
    for (k, v) in &e.1 {
        line[format!("eval_{k}")] = json!(v);
    }
    tracing::info!("step {step} eval_loss {:.4}", e.0);
    metrics.write(&line)
}

/// Mean loss (and metrics) over the validation split, without gradients or dropout.
pub fn evaluate(
    objective: &mut dyn Objective,
    model: &dyn ModelState,
    batch_size: usize,
) -> Result<(f64, BTreeMap<String, f64>)> {
    model.set_training(false);
    let n = objective.len(Split::Validation);
    let all: Vec<usize> = (0..n).collect();
    let units: f64 = all.iter().map(|&e| objective.units(Split::Validation, e)).sum::<f64>().max(1.0);
    let mut loss = 0f64;
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let _guard = tch::no_grad_guard();
    for chunk in all.chunks(batch_size.max(1)) {
        let mb = objective.forward(Split::Validation, chunk)?;
        loss += mb.loss_sum.f_double_value(&[])?;
        for (k, v) in mb.metrics {
            *sums.entry(k).or_default() += v;
        }
    }
    model.set_training(true);
    Ok((loss / units, sums.into_iter().map(|(k, v)| (k, v / units)).collect()))
}

fn save_checkpoint(out: &Path, state: &LoopState, opt: &AdamW, model: &dyn ModelState, keep: usize) -> Result<()> {
    if !opt.all_finite()? {
        bail!("step {}: weights are not finite; refusing to save a checkpoint", state.step);
    }
    write_checkpoint(out, state.step, keep, |tmp| {
        model.save(tmp)?;
        write_train_state(tmp, &[("optimizer", opt)], state)
    })
}

/// A progress bar over `total` steps when stderr is a terminal (None otherwise: log lines instead).
pub fn progress_bar(total: u64, at: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    let style =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {elapsed} elapsed · ETA {eta} · {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
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
    fn total_steps_from_epochs() {
        let s = TrainSection { epochs: 2.0, batch_size: 4, grad_accum: 2, ..Default::default() };
        assert_eq!(total_steps(&s, 20), 5);
        let s = TrainSection { max_steps: 7, ..Default::default() };
        assert_eq!(total_steps(&s, 20), 7);
    }
}
