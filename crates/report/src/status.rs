//! The per-stage summary row of a run (what `align status` prints and `report.html` tabulates):
//! kind, status, steps, the headline metric, duration, stale reason, error and diagnosis.
use serde::Serialize;
use serde_json::{json, Value};

use crate::diagnose::{diagnose, format_value, Thresholds};
use crate::run::{RunDir, Stage, StageKind, StageStatus};
use align_runs::metrics;

/// One stage's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusRow {
    pub stage: String,
    pub kind: Option<StageKind>,
    pub status: StageStatus,
    pub steps: Option<u64>,
    pub total_steps: Option<u64>,
    /// The stage's headline number: last loss (PPO: last reward; eval: its first score).
    pub metric: Option<(String, f64)>,
    pub duration_seconds: Option<f64>,
    pub stale_reason: Option<String>,
    pub error: Option<String>,
    pub diagnosis: String,
}

/// Eval result keys shown first when an eval stage's JSON has them.
const EVAL_HEADLINE_KEYS: [&str; 10] = [
    "winrate",
    "win_rate",
    "acc",
    "exact_match",
    "bleu4",
    "rouge_l",
    "char_f1",
    "accuracy",
    "perplexity",
    metrics::EVAL_LOSS,
];

/// The numeric top-level fields of an eval result (headline keys first), and nested objects'
/// numeric fields as `outer.inner`.
pub fn eval_numbers(eval: &Value) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    let Value::Object(obj) = eval else {
        return out;
    };
    for (k, v) in obj {
        match v {
            Value::Number(n) => out.extend(n.as_f64().map(|x| (k.clone(), x))),
            Value::Object(inner) => {
                for (k2, v2) in inner {
                    if let Some(x) = v2.as_f64() {
                        out.push((format!("{k}.{k2}"), x));
                    }
                }
            }
            _ => {}
        }
    }
    let rank = |name: &str| {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        EVAL_HEADLINE_KEYS.iter().position(|k| *k == leaf).unwrap_or(EVAL_HEADLINE_KEYS.len())
    };
    out.sort_by_key(|(k, _)| rank(k));
    out
}

/// An eval result number: integers as integers (`samples 40`), others as `format_value`.
pub fn format_eval_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format_value(v)
    }
}

/// The stage's headline number and its name.
pub fn headline_metric(stage: &Stage) -> Option<(String, f64)> {
    let last = |name: &str| stage.metrics.last(name).map(|v| (name.to_string(), v));
    match stage.kind() {
        Some(k) if k.records_results() => {
            stage.record.as_ref().and_then(|r| r.eval.as_ref()).and_then(|e| eval_numbers(e).into_iter().next())
        }
        Some(StageKind::Ppo) => {
            last(metrics::RLHF_REWARD).or_else(|| last(metrics::SCORES)).or_else(|| last(metrics::LOSS))
        }
        Some(k) if k.samples_groups() => last("reward").or_else(|| last(metrics::LOSS)),
        _ => stage
            .summary()
            .and_then(|s| s.last_loss)
            .filter(|v| v.is_finite())
            .map(|v| (metrics::LOSS.to_string(), v))
            .or_else(|| last(metrics::LOSS)),
    }
}

/// The one-line diagnosis shown for a stage.
pub fn stage_diagnosis(stage: &Stage, t: &Thresholds) -> String {
    if stage.kind().is_some_and(StageKind::records_results) {
        let numbers = stage.record.as_ref().and_then(|r| r.eval.as_ref()).map(eval_numbers).unwrap_or_default();
        if numbers.is_empty() {
            return if stage.status() == StageStatus::Done {
                "no numeric results".into()
            } else {
                "no results yet".into()
            };
        }
        let shown: Vec<String> =
            numbers.iter().take(4).map(|(k, v)| format!("{k} {}", format_eval_value(*v))).collect();
        return format!("results: {}", shown.join(", "));
    }
    if stage.metrics.train.is_empty() {
        return match stage.status() {
            StageStatus::Pending => "not started".into(),
            StageStatus::Failed => "failed before logging a step".into(),
            StageStatus::Running => "running, no step logged yet".into(),
            _ => "no metrics".into(),
        };
    }
    diagnose(stage.kind(), &stage.metrics, t).to_string()
}

/// The rows of every stage of a run, in pipeline order.
pub fn status_rows(run: &RunDir, t: &Thresholds) -> Vec<StatusRow> {
    run.stages
        .iter()
        .map(|stage| {
            let (steps, total_steps) = stage.steps();
            let record = stage.record.as_ref();
            StatusRow {
                stage: stage.name.clone(),
                kind: stage.kind(),
                status: stage.status(),
                steps,
                total_steps,
                metric: headline_metric(stage),
                duration_seconds: stage.duration_seconds(),
                stale_reason: record.and_then(|r| r.stale_reason.clone()),
                error: record.and_then(|r| r.error.clone()),
                diagnosis: stage_diagnosis(stage, t),
            }
        })
        .collect()
}

/// Seconds as `12.3s`, `4m05s` or `2h03m`.
pub fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds.round() as u64;
    if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

impl StatusRow {
    /// `12/200`, `12` (total unknown) or `-`.
    pub fn steps_text(&self) -> String {
        match (self.steps, self.total_steps) {
            (Some(s), Some(t)) => format!("{s}/{t}"),
            (Some(s), None) => s.to_string(),
            (None, Some(t)) => format!("0/{t}"),
            (None, None) => "-".into(),
        }
    }

    /// `loss 1.2345` or `-`.
    pub fn metric_text(&self) -> String {
        let format = if self.kind.is_some_and(StageKind::records_results) { format_eval_value } else { format_value };
        self.metric.as_ref().map(|(k, v)| format!("{k} {}", format(*v))).unwrap_or_else(|| "-".into())
    }

    pub fn duration_text(&self) -> String {
        self.duration_seconds.map(format_duration).unwrap_or_else(|| "-".into())
    }

    pub fn kind_text(&self) -> &'static str {
        self.kind.map(|k| k.as_str()).unwrap_or("-")
    }
}

/// The rows as an aligned text table: stage, kind, status, steps, last loss/metric, duration,
/// stale reason / error; the diagnosis of each stage follows on its own line.
pub fn status_table(rows: &[StatusRow]) -> String {
    let header = ["stage", "kind", "status", "steps", "last loss/metric", "duration", "stale reason / error"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let note = match (&r.stale_reason, &r.error) {
                (Some(s), _) => s.clone(),
                (None, Some(e)) => format!("error: {}", e.lines().next().unwrap_or("")),
                (None, None) => "-".into(),
            };
            [
                r.stage.clone(),
                r.kind_text().to_string(),
                r.status.as_str().to_string(),
                r.steps_text(),
                r.metric_text(),
                r.duration_text(),
                note,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let fmt_row = |row: &[String]| {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = fmt_row(&header.map(str::to_string));
    for row in &cells {
        out.push_str(&fmt_row(row));
    }
    out.push('\n');
    let name_width = rows.iter().map(|r| r.stage.chars().count()).max().unwrap_or(0);
    for r in rows {
        out.push_str(&format!("{:<name_width$}  {}\n", r.stage, r.diagnosis));
    }
    out
}

/// The rows as JSON: `{"name", "run_dir", "stages": [{stage, kind, status, steps, total_steps,
/// metric: {name, value} | null, duration_seconds, stale_reason, error, diagnosis}]}`.
pub fn status_json(run: &RunDir, rows: &[StatusRow]) -> Value {
    let stages: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "stage": r.stage,
                "kind": r.kind,
                "status": r.status,
                "steps": r.steps,
                "total_steps": r.total_steps,
                "metric": r.metric.as_ref().map(|(k, v)| json!({"name": k, "value": v})),
                "duration_seconds": r.duration_seconds,
                "stale_reason": r.stale_reason,
                "error": r.error,
                "diagnosis": r.diagnosis,
            })
        })
        .collect();
    json!({"name": run.name, "run_dir": run.path.display().to_string(), "stages": stages})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(12.34), "12.3s");
        assert_eq!(format_duration(245.0), "4m05s");
        assert_eq!(format_duration(7385.0), "2h03m");
        assert_eq!(format_duration(f64::NAN), "-");
    }

    #[test]
    fn eval_numbers_put_headline_scores_first() {
        let v = json!({"samples": 40, "bleu4": 0.1, "by_file": {"rouge_l": 0.3}, "examples": []});
        let n = eval_numbers(&v);
        assert_eq!(n[0], ("bleu4".to_string(), 0.1));
        assert_eq!(n[1], ("by_file.rouge_l".to_string(), 0.3));
        assert_eq!(n[2], ("samples".to_string(), 40.0));
    }
}
