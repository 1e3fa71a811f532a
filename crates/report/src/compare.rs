//! `align compare`: several run folders side by side — every eval stage's numeric results, each
//! training stage's final figures (last loss, eval loss, steps, duration from its summary; the
//! last reward / accuracy metrics from its log), and the configuration keys that differ between
//! the runs (each stage's recorded config in `stage.json`, flattened to `stage.key.path = value`,
//! with each run's own folder written `RUN_DIR` so that output paths do not count as
//! differences). As a text table, JSON, or an HTML page in the report's style.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use align_runs::metrics;

use crate::diagnose::format_value;
use crate::html::{escape, STYLE};
use crate::run::{RunDir, StageKind};
use crate::status::eval_numbers;

/// The last logged values shown for a training stage, when its log has them.
const FINAL_METRICS: [&str; 8] = [
    metrics::ACCURACY,
    metrics::MARGIN,
    metrics::REWARDS_ACCURACIES,
    metrics::REWARDS_MARGINS,
    metrics::SCORES,
    metrics::RLHF_REWARD,
    metrics::KL,
    metrics::EOS_RATE,
];

/// One figure across the runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRow {
    pub stage: String,
    /// `eval` (an eval stage's result) or `train` (a training stage's final figure).
    pub section: &'static str,
    pub metric: String,
    /// One per run, in the order given; None where the run has no such figure.
    pub values: Vec<Option<f64>>,
}

/// One configuration key whose value is not the same in every run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigDiff {
    pub key: String,
    /// One per run; None where the run has no such key.
    pub values: Vec<Option<String>>,
}

/// The comparison of several runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Run labels: the pipeline name, or the folder name when names repeat.
    pub runs: Vec<String>,
    pub paths: Vec<PathBuf>,
    pub metrics: Vec<MetricRow>,
    pub config: Vec<ConfigDiff>,
}

fn push_value(
    rows: &mut Vec<MetricRow>,
    n: usize,
    run: usize,
    stage: &str,
    section: &'static str,
    metric: &str,
    v: f64,
) {
    let i = match rows.iter().position(|r| r.stage == stage && r.section == section && r.metric == metric) {
        Some(i) => i,
        None => {
            rows.push(MetricRow {
                stage: stage.to_string(),
                section,
                metric: metric.to_string(),
                values: vec![None; n],
            });
            rows.len() - 1
        }
    };
    rows[i].values[run] = Some(v);
}

/// `value` flattened into `prefix.key = text` pairs: objects by key, lists of scalars as one
/// JSON value, lists with objects by index (`key[0].x`).
pub fn flatten_json(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(obj) => {
            for (k, v) in obj {
                flatten_json(&format!("{prefix}.{k}"), v, out);
            }
        }
        Value::Array(items) if items.iter().any(|v| v.is_object() || v.is_array()) => {
            for (i, v) in items.iter().enumerate() {
                flatten_json(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The flattened configuration of a run: each stage's kind, its eval kind's results aside, and
/// its recorded config; `RUN_DIR` for the run's own folder.
fn run_config(run: &RunDir) -> BTreeMap<String, String> {
    let mut flat = BTreeMap::new();
    for stage in &run.stages {
        let Some(record) = &stage.record else { continue };
        flat.insert(format!("{}.kind", stage.name), record.kind.as_str().to_string());
        flatten_json(&stage.name, &record.config, &mut flat);
    }
    let mut roots = vec![run.path.display().to_string()];
    if let Ok(c) = run.path.canonicalize() {
        roots.push(c.display().to_string());
    }
    roots.sort_by_key(|r| std::cmp::Reverse(r.len()));
    for v in flat.values_mut() {
        for root in &roots {
            if !root.is_empty() && v.contains(root.as_str()) {
                *v = v.replace(root.as_str(), "RUN_DIR");
            }
        }
    }
    flat
}

/// Compares the runs: every eval and final training figure, and the config keys that differ.
pub fn compare_runs(runs: &[RunDir]) -> Result<Comparison> {
    if runs.len() < 2 {
        bail!("compare: expected at least two run folders, found {}", runs.len());
    }
    let n = runs.len();
    let mut labels: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    let names_repeat = (0..n).any(|i| labels[i + 1..].contains(&labels[i]));
    if names_repeat {
        labels = runs
            .iter()
            .map(|r| r.path.file_name().map_or_else(|| r.path.display().to_string(), |f| f.to_string_lossy().into()))
            .collect();
        if (0..n).any(|i| labels[i + 1..].contains(&labels[i])) {
            labels = runs.iter().map(|r| r.path.display().to_string()).collect();
        }
    }
    let mut rows = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        for stage in &run.stages {
            let Some(record) = &stage.record else { continue };
            if record.kind == StageKind::Eval {
                for (k, v) in record.eval.as_ref().map(eval_numbers).unwrap_or_default() {
                    push_value(&mut rows, n, i, &stage.name, "eval", &k, v);
                }
            }
            if let Some(s) = &record.summary {
                let mut figures: Vec<(&str, Option<f64>)> = vec![
                    ("last_loss", s.last_loss),
                    ("eval_loss", s.eval_loss),
                    ("best_eval_loss", s.best_eval_loss),
                    ("steps", Some(s.steps as f64)),
                ];
                for m in FINAL_METRICS {
                    figures.push((m, stage.metrics.last(m)));
                }
                figures.push(("duration_seconds", stage.duration_seconds()));
                for (name, v) in figures {
                    if let Some(v) = v {
                        push_value(&mut rows, n, i, &stage.name, "train", name, v);
                    }
                }
            }
        }
    }
    let configs: Vec<BTreeMap<String, String>> = runs.iter().map(run_config).collect();
    let mut keys: Vec<&String> = configs.iter().flat_map(|c| c.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut config = Vec::new();
    for key in keys {
        let values: Vec<Option<String>> = configs.iter().map(|c| c.get(key).cloned()).collect();
        if values.iter().any(|v| v != &values[0]) {
            config.push(ConfigDiff { key: key.clone(), values });
        }
    }
    Ok(Comparison { runs: labels, paths: runs.iter().map(|r| r.path.clone()).collect(), metrics: rows, config })
}

/// A figure as text: whole numbers (steps, samples) without decimals, others as the report does.
fn cell(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format_value(x),
    }
}

/// The comparison as plain-text tables: the figures, then the config differences.
pub fn compare_table(c: &Comparison) -> String {
    let mut out = String::new();
    let head = |first: &[&str]| {
        let mut cols: Vec<String> = first.iter().map(|s| s.to_string()).collect();
        cols.extend(c.runs.iter().cloned());
        cols
    };
    let mut metric_rows = vec![head(&["stage", "metric"])];
    for r in &c.metrics {
        let mut cols = vec![r.stage.clone(), r.metric.clone()];
        cols.extend(r.values.iter().map(|v| cell(*v)));
        metric_rows.push(cols);
    }
    out.push_str(&align_columns(&metric_rows));
    out.push('\n');
    if c.config.is_empty() {
        out.push_str("config: the same in every run\n");
    } else {
        let mut rows = vec![head(&["config key"])];
        for d in &c.config {
            let mut cols = vec![d.key.clone()];
            cols.extend(d.values.iter().map(|v| v.clone().unwrap_or_else(|| "-".to_string())));
            rows.push(cols);
        }
        out.push_str(&align_columns(&rows));
    }
    out
}

fn align_columns(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|j| rows.iter().filter_map(|r| r.get(j)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(j, s)| format!("{s:<w$}", w = widths[j])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The comparison as a self-contained HTML page in the report's style (no scripts).
pub fn compare_html(c: &Comparison) -> String {
    let mut html = String::new();
    let title = format!("align compare: {}", c.runs.join(" · "));
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(&title)
    );
    let _ = write!(html, "<h1>{}</h1><table class=\"kv\">", escape(&title));
    for (label, path) in c.runs.iter().zip(&c.paths) {
        let _ = write!(html, "<tr><th>{}</th><td>{}</td></tr>", escape(label), escape(&path.display().to_string()));
    }
    html.push_str("</table>");
    let head = |first: &str| {
        let mut h = format!("<tr><th>{first}</th>");
        for r in &c.runs {
            let _ = write!(h, "<th>{}</th>", escape(r));
        }
        h.push_str("</tr>");
        h
    };
    html.push_str("<h2>Results</h2><table class=\"rows\">");
    html.push_str(&head("stage</th><th>metric"));
    for r in &c.metrics {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}{}</td>",
            escape(&r.stage),
            escape(&r.metric),
            if r.section == "train" { " <span class=\"muted\">(train)</span>" } else { "" }
        );
        for v in &r.values {
            let _ = write!(html, "<td>{}</td>", escape(&cell(*v)));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table><h2>Configuration differences</h2>");
    if c.config.is_empty() {
        html.push_str("<p class=\"muted\">The recorded configuration is the same in every run.</p>");
    } else {
        html.push_str("<table class=\"rows\">");
        html.push_str(&head("key"));
        for d in &c.config {
            let _ = write!(html, "<tr><td>{}</td>", escape(&d.key));
            for v in &d.values {
                match v {
                    Some(v) => {
                        let _ = write!(html, "<td><span class=\"text\">{}</span></td>", escape(v));
                    }
                    None => html.push_str("<td><span class=\"muted\">-</span></td>"),
                }
            }
            html.push_str("</tr>");
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    html
}

/// Writes `compare_html` to `path` (its folder created if needed).
pub fn write_compare_html(c: &Comparison, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    std::fs::write(path, compare_html(c)).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{MetricLog, Stage, StageRecord, StageStatus};
    use serde_json::json;

    fn run(path: &str, name: &str, lr: f64, bleu: f64, eval_kind_stage: &str) -> RunDir {
        let mut train = StageRecord::new("sft", StageKind::Sft);
        train.status = StageStatus::Done;
        train.config = json!({"train": {"lr": lr, "output_dir": format!("{path}/sft")}, "data": ["a.jsonl"]});
        train.summary =
            Some(align_runs::TrainSummary { steps: 3, last_loss: Some(2.5), seconds: 1.5, ..Default::default() });
        let mut eval = StageRecord::new(eval_kind_stage, StageKind::Eval);
        eval.status = StageStatus::Done;
        eval.eval = Some(json!({"eval": "answers", "bleu4": bleu, "samples": 3}));
        let stage = |name: &str, record: StageRecord| Stage {
            name: name.to_string(),
            dir: PathBuf::from(path).join(name),
            record: Some(record),
            metrics: MetricLog::default(),
        };
        RunDir {
            path: PathBuf::from(path),
            name: name.to_string(),
            pipeline_file: None,
            stages: vec![stage("sft", train), stage(eval_kind_stage, eval)],
        }
    }

    #[test]
    fn figures_line_up_by_stage_and_only_differing_config_is_kept() {
        let c = compare_runs(&[run("/r/a", "demo", 1e-3, 0.1, "answers"), run("/r/b", "demo", 1e-2, 0.2, "answers")])
            .unwrap();
        // the same pipeline name twice: folder names label the runs
        assert_eq!(c.runs, ["a", "b"]);
        let bleu = c.metrics.iter().find(|r| r.metric == "bleu4").unwrap();
        assert_eq!((bleu.stage.as_str(), bleu.values.clone()), ("answers", vec![Some(0.1), Some(0.2)]));
        let loss = c.metrics.iter().find(|r| r.metric == "last_loss").unwrap();
        assert_eq!((loss.section, loss.values.clone()), ("train", vec![Some(2.5), Some(2.5)]));
        // output_dir differs only by the run folder: not a difference
        let keys: Vec<&str> = c.config.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["sft.train.lr"]);
        assert_eq!(c.config[0].values, [Some("0.001".to_string()), Some("0.01".to_string())]);
        let table = compare_table(&c);
        assert!(table.contains("answers  bleu4") && table.contains("sft.train.lr"), "{table}");
        let html = compare_html(&c);
        assert!(html.contains("<td>sft.train.lr</td>") && html.contains("0.1000"), "{html}");
    }

    #[test]
    fn a_stage_only_one_run_has_leaves_gaps() {
        let c =
            compare_runs(&[run("/r/a", "ppo", 1e-3, 0.1, "answers"), run("/r/b", "dpo", 1e-3, 0.3, "judge")]).unwrap();
        assert_eq!(c.runs, ["ppo", "dpo"]);
        let rows: Vec<(&str, Vec<Option<f64>>)> =
            c.metrics.iter().filter(|r| r.metric == "bleu4").map(|r| (r.stage.as_str(), r.values.clone())).collect();
        assert_eq!(rows, [("answers", vec![Some(0.1), None]), ("judge", vec![None, Some(0.3)])]);
        assert!(c.config.iter().any(|d| d.key == "answers.kind" && d.values == [Some("eval".into()), None]));
        assert!(compare_runs(&[run("/r/a", "x", 1e-3, 0.1, "e")]).is_err());
    }
}
