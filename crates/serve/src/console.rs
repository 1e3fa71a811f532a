//! The web console: one plain HTML/JS page shipped inside the binary (no CDN) with a chat
//! playground (streaming, sampling parameters, the served models and adapters) and a run
//! dashboard (each pipeline stage's status and diagnosis, live loss / reward / KL curves read
//! from metrics.jsonl while training runs, the latest samples), plus `GET /api/runs`, the JSON
//! it draws from. `align board RUN_DIR…` serves the dashboard alone, without a model.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use align_report::{read_run_dir, status_json, status_rows, Thresholds};
use anyhow::{Context, Result};
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::AppState;

/// The console page.
pub const PAGE: &str = include_str!("console.html");

/// Metric names the dashboard plots when a stage logs them (TRL's names).
const CURVES: &[&str] = &[
    "loss",
    "eval_loss",
    "objective/rlhf_reward",
    "objective/scores",
    "objective/kl",
    "rewards/margins",
    "rewards/accuracies",
    "reward",
    "kl",
];

/// Most points per curve sent to the page (evenly thinned).
const MAX_POINTS: usize = 400;
/// Samples shown per stage (the newest).
const SAMPLES: usize = 5;

fn thin(points: Vec<(u64, f64)>) -> Vec<(u64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let stride = points.len().div_ceil(MAX_POINTS);
    let last = points.last().copied();
    let mut out: Vec<(u64, f64)> = points.into_iter().step_by(stride).collect();
    if let Some(l) = last {
        if out.last() != Some(&l) {
            out.push(l);
        }
    }
    out
}

fn last_samples(dir: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(dir.join(align_runs::files::SAMPLES)) else { return Vec::new() };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(SAMPLES)..].iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// One run folder as the dashboard draws it: the status rows plus, per stage, its curves and
/// latest samples. A folder that cannot be read gives `{"run_dir", "error"}`.
pub fn run_json(dir: &Path) -> Value {
    let run = match read_run_dir(dir) {
        Ok(r) => r,
        Err(e) => return json!({"run_dir": dir.display().to_string(), "error": format!("{e:#}")}),
    };
    let rows = status_rows(&run, &Thresholds::default());
    let mut out = status_json(&run, &rows);
    let details: Vec<Value> = run
        .stages
        .iter()
        .map(|stage| {
            let mut curves = serde_json::Map::new();
            for name in CURVES {
                let train = stage.metrics.series(name);
                let series = if train.is_empty() { stage.metrics.eval_series(name) } else { train };
                if !series.is_empty() {
                    curves.insert(name.to_string(), json!(thin(series)));
                }
            }
            json!({"stage": stage.name, "curves": curves, "samples": last_samples(&stage.dir)})
        })
        .collect();
    out["details"] = Value::Array(details);
    out
}

fn runs_value(runs: &[PathBuf]) -> Value {
    json!({"runs": runs.iter().map(|r| run_json(r)).collect::<Vec<_>>()})
}

pub(crate) async fn runs_json(State(st): State<Arc<AppState>>) -> Response {
    let runs = st.runs.clone();
    match tokio::task::spawn_blocking(move || runs_value(&runs)).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => crate::internal(format!("reading the runs failed: {e}")).into_response(),
    }
}

/// `align board RUN_DIR…`: serves the console's dashboard for run folders, without a model,
/// until Ctrl-C / SIGTERM.
pub fn board_page(runs: Vec<PathBuf>, host: &str, port: u16) -> Result<()> {
    for r in &runs {
        if !r.is_dir() {
            anyhow::bail!("{}: no such run folder", r.display());
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(1).build()?;
    runtime.block_on(async move {
        let runs = Arc::new(runs);
        let app = Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route(
                "/api/runs",
                get(move || {
                    let runs = runs.clone();
                    async move {
                        match tokio::task::spawn_blocking(move || runs_value(&runs)).await {
                            Ok(v) => axum::Json(v).into_response(),
                            Err(e) => crate::internal(format!("reading the runs failed: {e}")).into_response(),
                        }
                    }
                }),
            )
            .fallback(crate::not_found);
        let addr = format!("{host}:{port}");
        let listener =
            tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("--host/--port: cannot bind {addr}"))?;
        println!("align board: listening on http://{}", listener.local_addr()?);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app).with_graceful_shutdown(crate::shutdown_signal()).await?;
        Ok(())
    })
}
