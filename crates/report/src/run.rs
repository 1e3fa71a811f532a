//! A pipeline run folder read into plain data: `pipeline.json` (name and stage order), each
//! `<stage>/stage.json` (kind, status, timing, training summary, eval results) and each training
//! stage's `<stage>/metrics.jsonl` (train lines and eval lines). Every error names the file, the
//! line where one is known, and the field.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use align_runs::files::{METRICS, PIPELINE_RECORD, STAGE_RECORD};
pub use align_runs::{StageKind, StageRecord, StageStatus, TrainSummary};

/// One line of `metrics.jsonl`: its step and its numeric fields (a `null`, which is how a
/// non-finite number is written, reads as NaN).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricLine {
    pub step: u64,
    pub values: BTreeMap<String, f64>,
    /// The trainer skipped this step's update because its loss or gradient was not finite.
    pub skipped_nonfinite: bool,
}

/// The lines of one `metrics.jsonl`, split into training steps and evaluations (a line whose
/// fields besides `step`/`epoch` all start with `eval_`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricLog {
    pub train: Vec<MetricLine>,
    pub eval: Vec<MetricLine>,
}

/// `(step, value)` points of one metric.
pub type Series = Vec<(u64, f64)>;

impl MetricLog {
    /// Parses `metrics.jsonl` text; `origin` (the file name) prefixes errors as `origin:line:`.
    /// An unparsable LAST line without a trailing newline is a line still being written and is
    /// left out; any other bad line is an error.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut log = MetricLog::default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let is_partial_tail = i + 1 == lines.len() && !text.ends_with('\n');
            let value: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) if is_partial_tail => break,
                Err(e) => bail!("{origin}:{}: invalid JSON: {e}", i + 1),
            };
            let Value::Object(obj) = value else {
                bail!("{origin}:{}: expected a JSON object, found {}", i + 1, value);
            };
            let (line, is_eval) = metric_line(&obj).map_err(|e| anyhow!("{origin}:{}: {e}", i + 1))?;
            if is_eval {
                log.eval.push(line);
            } else {
                log.train.push(line);
            }
        }
        Ok(log)
    }

    /// Reads `path`; a missing file is an empty log (a stage that has not logged yet).
    pub fn read(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Ok(MetricLog::default());
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        MetricLog::parse(&text, &path.display().to_string())
    }

    /// The training-step points of `name` (NaN where the value was not finite).
    pub fn series(&self, name: &str) -> Series {
        pick(&self.train, name)
    }

    /// The evaluation points of `name` (e.g. `eval_loss`).
    pub fn eval_series(&self, name: &str) -> Series {
        pick(&self.eval, name)
    }

    pub fn is_empty(&self) -> bool {
        self.train.is_empty() && self.eval.is_empty()
    }

    /// The last finite value of a training metric.
    pub fn last(&self, name: &str) -> Option<f64> {
        self.train.iter().rev().filter_map(|l| l.values.get(name)).copied().find(|v| v.is_finite())
    }

    /// The step of the last training line.
    pub fn last_step(&self) -> Option<u64> {
        self.train.last().map(|l| l.step)
    }
}

fn pick(lines: &[MetricLine], name: &str) -> Series {
    lines.iter().filter_map(|l| l.values.get(name).map(|v| (l.step, *v))).collect()
}

fn metric_line(obj: &Map<String, Value>) -> Result<(MetricLine, bool)> {
    let step = match obj.get("step") {
        Some(v) => v.as_u64().ok_or_else(|| anyhow!("field 'step': expected a non-negative integer, found {v}"))?,
        None => bail!("field 'step': missing"),
    };
    let mut line = MetricLine { step, ..Default::default() };
    let mut is_eval = true;
    let mut any = false;
    for (k, v) in obj {
        if k == "step" {
            continue;
        }
        if k == "skipped_nonfinite" {
            line.skipped_nonfinite = v.as_bool().unwrap_or(false);
            continue;
        }
        let value = match v {
            Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
            Value::Null => f64::NAN,
            _ => continue,
        };
        if k != "epoch" {
            any = true;
            is_eval &= k.starts_with("eval_");
        }
        line.values.insert(k.clone(), value);
    }
    Ok((line, any && is_eval))
}

/// One stage of a run: its folder, its record (None before the runner wrote `stage.json`) and
/// its metrics.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub dir: PathBuf,
    pub record: Option<StageRecord>,
    pub metrics: MetricLog,
}

impl Stage {
    pub fn kind(&self) -> Option<StageKind> {
        self.record.as_ref().map(|r| r.kind)
    }

    /// The record's status; a stage without `stage.json` is pending.
    pub fn status(&self) -> StageStatus {
        self.record.as_ref().map(|r| r.status).unwrap_or(StageStatus::Pending)
    }

    pub fn summary(&self) -> Option<&TrainSummary> {
        self.record.as_ref().and_then(|r| r.summary.as_ref())
    }

    /// Steps done (summary, else the last logged step) and the planned total when known.
    pub fn steps(&self) -> (Option<u64>, Option<u64>) {
        let summary = self.summary();
        let done = summary.map(|s| s.steps).or_else(|| self.metrics.last_step());
        (done, summary.map(|s| s.total_steps))
    }

    /// Wall-clock seconds: `duration_seconds`, else the training summary's seconds.
    pub fn duration_seconds(&self) -> Option<f64> {
        let r = self.record.as_ref()?;
        r.duration_seconds.or_else(|| r.summary.as_ref().map(|s| s.seconds))
    }
}

/// A whole run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
    pub name: String,
    /// The pipeline file the run was made from, as `pipeline.json` names it.
    pub pipeline_file: Option<String>,
    pub stages: Vec<Stage>,
}

/// Reads a JSON file; syntax errors name `file:line`.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), e.line()))
}

fn opt_string(obj: &Map<String, Value>, field: &str, file: &Path) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{}: field '{field}': expected a string or null, found {other}", file.display()),
    }
}

fn opt_number(obj: &Map<String, Value>, field: &str, file: &Path) -> Result<Option<f64>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => bail!("{}: field '{field}': expected a number or null, found {other}", file.display()),
    }
}

fn one_of<T: Copy>(
    obj: &Map<String, Value>,
    field: &str,
    file: &Path,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
) -> Result<T> {
    let expected = names.join(", ");
    match obj.get(field) {
        Some(Value::String(s)) => parse(s)
            .ok_or_else(|| anyhow!("{}: field '{field}': expected one of {expected}, found '{s}'", file.display())),
        Some(other) => bail!("{}: field '{field}': expected one of {expected}, found {other}", file.display()),
        None => bail!("{}: field '{field}': missing (expected one of {expected})", file.display()),
    }
}

/// Reads one `stage.json`.
pub fn read_stage_record(path: &Path) -> Result<StageRecord> {
    let v = read_json(path)?;
    let Value::Object(obj) = v else {
        bail!("{}: expected a JSON object, found {v}", path.display());
    };
    let kinds: Vec<&str> = StageKind::ALL.iter().map(|k| k.as_str()).collect();
    let statuses: Vec<&str> = StageStatus::ALL.iter().map(|k| k.as_str()).collect();
    one_of(&obj, "kind", path, StageKind::parse, &kinds)?;
    one_of(&obj, "status", path, StageStatus::parse, &statuses)?;
    for field in ["stale_reason", "config_hash", "started_at", "finished_at", "error"] {
        opt_string(&obj, field, path)?;
    }
    opt_number(&obj, "duration_seconds", path)?;
    match obj.get("summary") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(other) => bail!("{}: field 'summary': expected an object or null, found {other}", path.display()),
    }
    serde_json::from_value::<StageRecord>(Value::Object(obj)).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Reads a run folder: `pipeline.json`, then every listed stage's folder (a stage without a
/// folder or `stage.json` yet is pending).
pub fn read_run_dir(path: &Path) -> Result<RunDir> {
    if !path.is_dir() {
        bail!("{}: no such run folder", path.display());
    }
    let manifest_path = path.join(PIPELINE_RECORD);
    if !manifest_path.is_file() {
        bail!("{}: missing (is {} a pipeline run folder?)", manifest_path.display(), path.display());
    }
    let v = read_json(&manifest_path)?;
    let Value::Object(obj) = v else {
        bail!("{}: expected a JSON object, found {v}", manifest_path.display());
    };
    let name = opt_string(&obj, "name", &manifest_path)?.unwrap_or_else(|| {
        path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".to_string())
    });
    let pipeline_file = opt_string(&obj, "file", &manifest_path)?;
    let names = match obj.get("stages") {
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Value::String(s) if !s.is_empty() && !s.contains(['/', '\\']) && s != "." && s != ".." => Ok(s.clone()),
                other => Err(anyhow!(
                    "{}: field 'stages' item {}: expected a stage folder name, found {other}",
                    manifest_path.display(),
                    i + 1
                )),
            })
            .collect::<Result<Vec<String>>>()?,
        Some(other) => bail!("{}: field 'stages': expected a list of names, found {other}", manifest_path.display()),
        None => bail!("{}: field 'stages': missing", manifest_path.display()),
    };
    let mut stages = Vec::with_capacity(names.len());
    for name in names {
        let dir = path.join(&name);
        let record_path = dir.join(STAGE_RECORD);
        let record = if record_path.is_file() { Some(read_stage_record(&record_path)?) } else { None };
        let metrics = MetricLog::read(&dir.join(METRICS))?;
        stages.push(Stage { name, dir, record, metrics });
    }
    Ok(RunDir { path: path.to_path_buf(), name, pipeline_file, stages })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lines_split_into_train_and_eval_and_null_reads_as_nan() {
        let text = concat!(
            "{\"step\":1,\"epoch\":0.1,\"loss\":2.0,\"lr\":0.001,\"grad_norm\":1.5}\n",
            "{\"step\":2,\"epoch\":0.2,\"loss\":null,\"lr\":0.001,\"grad_norm\":null,\"skipped_nonfinite\":true}\n",
            "{\"step\":2,\"eval_loss\":1.9,\"eval_accuracy\":0.5}\n",
        );
        let log = MetricLog::parse(text, "m.jsonl").unwrap();
        assert_eq!(log.train.len(), 2);
        assert_eq!(log.eval.len(), 1);
        assert!(log.train[1].skipped_nonfinite);
        assert!(log.series("loss")[1].1.is_nan());
        assert_eq!(log.eval_series("eval_loss"), vec![(2, 1.9)]);
        assert_eq!(log.last("loss"), Some(2.0));
        assert_eq!(log.last_step(), Some(2));
    }

    #[test]
    fn bad_metric_lines_name_file_line_and_field() {
        let e = MetricLog::parse("{\"step\":1,\"loss\":1}\nnot json\n", "run/sft/metrics.jsonl").unwrap_err();
        assert!(e.to_string().starts_with("run/sft/metrics.jsonl:2: invalid JSON"), "{e}");
        let e = MetricLog::parse("{\"loss\":1}\n", "m.jsonl").unwrap_err();
        assert_eq!(e.to_string(), "m.jsonl:1: field 'step': missing");
        let e = MetricLog::parse("{\"step\":-1,\"loss\":1}\n", "m.jsonl").unwrap_err();
        assert_eq!(e.to_string(), "m.jsonl:1: field 'step': expected a non-negative integer, found -1");
        // a half-written last line (no newline yet) is left out
        let log = MetricLog::parse("{\"step\":1,\"loss\":1}\n{\"step\":2,\"lo", "m.jsonl").unwrap();
        assert_eq!(log.train.len(), 1);
    }
}
