//! align-report: reads a pipeline run folder and reports on it — the status table, a one-line
//! diagnosis per stage, PNG plots of each stage's metrics and a self-contained `report.html`;
//! and compares several runs (`compare`).
//! No libtorch: it only reads the files the pipeline runner and the trainer write.
pub mod compare;
pub mod diagnose;
pub mod html;
pub mod plots;
pub mod run;
pub mod status;

pub use compare::{compare_html, compare_runs, compare_table, write_compare_html, Comparison};
pub use diagnose::{diagnose, Diagnosis, Thresholds};
pub use html::{write_report, ReportFiles};
pub use run::{read_run_dir, MetricLog, RunDir, Stage, StageKind, StageRecord, StageStatus};
pub use status::{status_json, status_rows, status_table, StatusRow};
