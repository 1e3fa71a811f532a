//! `report.html` and its PNGs for a run folder: the stage table (with each stage's diagnosis),
//! then per stage its summary, plots (relative `<img>` links to PNGs beside the page) and eval
//! results as tables. The page has no scripts and loads nothing but its own PNGs.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::diagnose::{format_value, Thresholds};
use crate::plots::{render_png, stage_plots};
use crate::run::{RunDir, Stage};
use crate::status::{status_rows, StatusRow};

/// What `write_report` wrote.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub pngs: Vec<PathBuf>,
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A stage name as a file-name part: letters, digits, `-` and `_` kept, anything else `_`.
pub fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Any JSON as HTML: objects as key/value tables, lists of objects as tables with one column per
/// key, other lists as lists, scalars as text (numbers compactly).
pub fn json_html(v: &Value) -> String {
    match v {
        Value::Null => "<span class=\"muted\">null</span>".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => escape(&format_value(x)),
            _ => n.to_string(),
        },
        Value::String(s) => format!("<span class=\"text\">{}</span>", escape(s)),
        Value::Object(obj) => {
            let mut out = String::from("<table class=\"kv\">");
            for (k, v) in obj {
                let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(k), json_html(v));
            }
            out.push_str("</table>");
            out
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            let mut columns: Vec<&str> = Vec::new();
            for item in items {
                if let Value::Object(obj) = item {
                    for k in obj.keys() {
                        if !columns.contains(&k.as_str()) {
                            columns.push(k);
                        }
                    }
                }
            }
            let mut out = String::from("<table class=\"rows\"><tr>");
            for c in &columns {
                let _ = write!(out, "<th>{}</th>", escape(c));
            }
            out.push_str("</tr>");
            for item in items {
                out.push_str("<tr>");
                for c in &columns {
                    let cell = item.get(*c).map(json_html).unwrap_or_default();
                    let _ = write!(out, "<td>{cell}</td>");
                }
                out.push_str("</tr>");
            }
            out.push_str("</table>");
            out
        }
        Value::Array(items) => {
            let mut out = String::from("<ol>");
            for item in items {
                let _ = write!(out, "<li>{}</li>", json_html(item));
            }
            out.push_str("</ol>");
            out
        }
    }
}

pub(crate) const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1000px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.5rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f5f5f5}table.kv th{width:12rem}.muted{color:#888}.text{white-space:pre-wrap}
.status-done{color:#1a7f37}.status-failed{color:#cf222e;font-weight:bold}.status-running{color:#0969da}.status-stale{color:#9a6700}.status-pending{color:#888}
.diag-ok{color:#1a7f37}.diag-warn{color:#cf222e}img{max-width:100%;border:1px solid #eee;margin:.4rem 0}pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;white-space:pre-wrap}";

fn stage_table(rows: &[StatusRow]) -> String {
    let mut out = String::from(
        "<table class=\"stages\"><tr><th>stage</th><th>kind</th><th>status</th><th>steps</th><th>last loss/metric</th><th>duration</th><th>diagnosis</th></tr>",
    );
    for r in rows {
        let diag_class = if r.diagnosis.starts_with("healthy") || r.diagnosis.starts_with("results") {
            "diag-ok"
        } else if r.diagnosis.starts_with("not started") || r.diagnosis.starts_with("no ") {
            "muted"
        } else {
            "diag-warn"
        };
        let mut status = r.status.as_str().to_string();
        if let Some(reason) = &r.stale_reason {
            status = format!("{status} ({reason})");
        }
        let _ = write!(
            out,
            "<tr><td><a href=\"#stage-{anchor}\">{name}</a></td><td>{kind}</td><td class=\"status-{st}\">{status}</td><td>{steps}</td><td>{metric}</td><td>{duration}</td><td class=\"{diag_class}\">{diag}</td></tr>",
            anchor = escape(&file_stem(&r.stage)),
            name = escape(&r.stage),
            kind = r.kind_text(),
            st = r.status.as_str(),
            status = escape(&status),
            steps = r.steps_text(),
            metric = escape(&r.metric_text()),
            duration = r.duration_text(),
            diag = escape(&r.diagnosis),
        );
    }
    out.push_str("</table>");
    out
}

fn stage_section(stage: &Stage, row: &StatusRow, images: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<h2 id=\"stage-{}\">{} <span class=\"muted\">({}, {})</span></h2>",
        escape(&file_stem(&stage.name)),
        escape(&stage.name),
        row.kind_text(),
        row.status.as_str()
    );
    let _ = write!(out, "<p><b>Diagnosis:</b> {}</p>", escape(&row.diagnosis));
    if let Some(record) = &stage.record {
        let mut facts: Vec<(String, String)> = Vec::new();
        if let Some(s) = &record.started_at {
            facts.push(("started".into(), s.clone()));
        }
        if let Some(s) = &record.finished_at {
            facts.push(("finished".into(), s.clone()));
        }
        facts.push(("duration".into(), row.duration_text()));
        if let Some(s) = &record.summary {
            if !s.stop_reason.is_empty() {
                facts.push(("stop reason".into(), s.stop_reason.clone()));
            }
            facts.push(("tokens seen".into(), s.tokens_seen.to_string()));
            if let Some(v) = s.eval_loss {
                facts.push(("last eval loss".into(), format_value(v)));
            }
            if let Some(v) = s.best_eval_loss {
                facts.push(("best eval loss".into(), format_value(v)));
            }
            if let Some(step) = s.best_step {
                facts.push(("best step".into(), step.to_string()));
            }
            if s.nonfinite_steps > 0 {
                facts.push(("non-finite steps".into(), s.nonfinite_steps.to_string()));
            }
            if let Some(d) = &s.final_dir {
                facts.push(("final model".into(), d.display().to_string()));
            }
            if let Some(d) = &s.best_dir {
                facts.push(("best model".into(), d.display().to_string()));
            }
        }
        if !record.config_hash.is_empty() {
            facts.push(("config hash".into(), record.config_hash.clone()));
        }
        if let Some(r) = &record.stale_reason {
            facts.push(("stale because".into(), r.clone()));
        }
        out.push_str("<table class=\"kv\">");
        for (k, v) in facts {
            let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(&k), escape(&v));
        }
        out.push_str("</table>");
        if let Some(e) = &record.error {
            let _ = write!(out, "<p><b>Error:</b></p><pre>{}</pre>", escape(e));
        }
    } else {
        out.push_str("<p class=\"muted\">No stage.json yet.</p>");
    }
    for (file, title) in images {
        let _ = write!(out, "<div><img src=\"{}\" alt=\"{}\"></div>", escape(file), escape(title));
    }
    if let Some(eval) = stage.record.as_ref().and_then(|r| r.eval.as_ref()) {
        out.push_str("<h3>Eval results</h3>");
        out.push_str(&json_html(eval));
    }
    out
}

/// Writes `report.html` and one PNG per plot of each stage into `out_dir` (created if needed).
pub fn write_report(run: &RunDir, out_dir: &Path, t: &Thresholds) -> Result<ReportFiles> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let rows = status_rows(run, t);
    let mut pngs = Vec::new();
    let mut sections = String::new();
    for (stage, row) in run.stages.iter().zip(&rows) {
        let mut images = Vec::new();
        for plot in stage_plots(stage) {
            let file = format!("{}_{}.png", file_stem(&stage.name), plot.slug);
            let path = out_dir.join(&file);
            render_png(&plot, &path)?;
            pngs.push(path);
            images.push((file, plot.title.clone()));
        }
        sections.push_str(&stage_section(stage, row, &images));
    }
    let mut html = String::new();
    let title = format!("align report: {}", run.name);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(&title)
    );
    let _ = write!(html, "<h1>{}</h1>", escape(&title));
    let _ = write!(html, "<p class=\"muted\">Run folder: {}", escape(&run.path.display().to_string()));
    if let Some(f) = &run.pipeline_file {
        let _ = write!(html, " · pipeline: {}", escape(f));
    }
    html.push_str("</p>");
    html.push_str(&stage_table(&rows));
    html.push_str(&sections);
    html.push_str("</body></html>\n");
    let path = out_dir.join("report.html");
    std::fs::write(&path, html).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(ReportFiles { html: path, pngs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn html_is_escaped_and_names_are_safe_file_stems() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(file_stem("sft v2/x"), "sft_v2_x");
    }

    #[test]
    fn json_lists_of_objects_become_tables() {
        let h = json_html(&json!({"bleu4": 0.5, "examples": [{"prompt": "<p>", "answer": "a"}, {"prompt": "q"}]}));
        assert!(h.contains("<th>bleu4</th><td>0.5000</td>"), "{h}");
        assert!(h.contains("<tr><th>prompt</th><th>answer</th></tr>"), "{h}");
        assert!(h.contains("&lt;p&gt;"), "{h}");
    }
}
