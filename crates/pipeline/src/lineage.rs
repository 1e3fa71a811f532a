//! Lineage: content hashes of models, data and tokenizers, and `stage.json` records (read,
//! written atomically, marked stale downstream) that decide whether a stage is up to date.
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use align_core::data::expand_data_paths;
use align_core::hf::folder::{folder_manifest, sha256_file};
use align_core::text::chat::strftime;
use align_core::train::config::sha256_hex;
use align_runs::files::STAGE_RECORD;
use align_runs::{StageRecord, StageStatus};

use crate::spec::*;

pub(crate) fn now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime("%Y-%m-%dT%H:%M:%SZ", secs)
}

/// SHA-256 over every file of a folder (names and contents, sorted), or of one file.
pub fn content_hash(path: &Path) -> Result<String> {
    let files: Vec<(String, String)> = if path.is_dir() {
        folder_manifest(path, None)?.into_iter().map(|(rel, d)| (rel, d.sha256)).collect()
    } else {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        vec![(name, sha256_file(path)?)]
    };
    let acc: String = files.iter().map(|(rel, sha)| format!("{rel}:{sha};")).collect();
    Ok(sha256_hex(acc.as_bytes()))
}

/// Hash of what decides tokenisation: tokenizer.json, tokenizer_config.json, chat template.
pub fn tokenizer_hash(dir: &Path) -> Result<String> {
    let mut acc = String::new();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        let p = dir.join(f);
        if p.is_file() {
            acc.push_str(&format!("{f}:{};", sha256_file(&p)?));
        }
    }
    if acc.is_empty() {
        bail!("{}: no tokenizer files", dir.display());
    }
    Ok(sha256_hex(acc.as_bytes()))
}

pub(crate) fn read_record(path: &Path) -> Option<StageRecord> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

pub(crate) fn write_record(dir: &Path, rec: &StageRecord) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    align_core::hf::folder::write_file_atomic(
        &dir.join(STAGE_RECORD),
        (serde_json::to_string_pretty(rec)? + "\n").as_bytes(),
    )
}

/// Content hashes of the stage's `data` files.
pub(crate) fn data_hashes(s: &StageSpec) -> Result<Vec<Value>> {
    let files = s
        .table
        .get("data")
        .and_then(|d| d.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut data = Vec::new();
    if files.is_empty() {
        return Ok(data); // an init stage reads no data files
    }
    for f in expand_data_paths(&files)? {
        data.push(json!({"path": f.display().to_string(), "hash": content_hash(&f)?}));
    }
    Ok(data)
}

pub(crate) fn mark_downstream_stale(p: &Pipeline, s: &StageSpec) -> Result<()> {
    for later in p.stages.iter().filter(|l| l.index > s.index) {
        let path = p.stage_dir(later).join(STAGE_RECORD);
        if let Some(mut r) = read_record(&path) {
            if r.status == StageStatus::Done {
                r.status = StageStatus::Stale;
                r.stale_reason = Some(format!("upstream stage '{}' is re-running", s.name));
                write_record(&p.stage_dir(later), &r)?;
            }
        }
    }
    Ok(())
}
