//! `align report`, `align status` and `align compare`: a pipeline run folder's HTML report (with
//! PNG plots), its status table, and several runs side by side, all from `align-report`.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use align_report::{
    compare_runs, compare_table, read_run_dir, status_json, status_rows, status_table, write_compare_html,
    write_report, Thresholds,
};

#[derive(Args)]
pub struct ReportArgs {
    /// A pipeline run folder (holds pipeline.json and one folder per stage).
    pub run_dir: PathBuf,
    /// Where report.html and the PNGs go (default: RUN_DIR/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct StatusArgs {
    /// A pipeline run folder (holds pipeline.json and one folder per stage).
    pub run_dir: PathBuf,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn report(args: ReportArgs) -> Result<()> {
    let run = read_run_dir(&args.run_dir)?;
    let out = args.out.unwrap_or_else(|| args.run_dir.join("report"));
    let files = write_report(&run, &out, &Thresholds::default())?;
    print!("{}", status_table(&status_rows(&run, &Thresholds::default())));
    println!("\nwrote {} ({} plots)", files.html.display(), files.pngs.len());
    Ok(())
}

pub fn status(args: StatusArgs) -> Result<()> {
    let run = read_run_dir(&args.run_dir)?;
    let rows = status_rows(&run, &Thresholds::default());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status_json(&run, &rows))?);
    } else {
        println!("{}  ({})", run.name, run.path.display());
        print!("{}", status_table(&rows));
    }
    Ok(())
}

#[derive(Args)]
pub struct CompareArgs {
    /// Two or more pipeline run folders.
    #[arg(required = true, num_args = 2..)]
    pub run_dirs: Vec<PathBuf>,
    /// Also write the comparison as an HTML page (the report's style, no scripts).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// One JSON object instead of the tables: {"runs","paths","metrics":[{"stage","section",
    /// "metric","values"}],"config":[{"key","values"}]}.
    #[arg(long)]
    pub json: bool,
}

pub fn compare(args: CompareArgs) -> Result<()> {
    let runs = args.run_dirs.iter().map(|d| read_run_dir(d)).collect::<Result<Vec<_>>>()?;
    let c = compare_runs(&runs)?;
    if let Some(path) = &args.html {
        write_compare_html(&c, path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", compare_table(&c));
        if let Some(path) = &args.html {
            println!("\nwrote {}", path.display());
        }
    }
    Ok(())
}
