//! Finding data files (paths, folders, glob patterns) and splitting a file into raw records:
//! JSON values of `.jsonl` lines or `.json` array items, or `.txt` documents, each with its origin.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{kind_name, Origin, TextMode};

/// The extensions data files may have.
pub(crate) const DATA_EXTENSIONS: [&str; 3] = ["jsonl", "json", "txt"];

/// The layout of a data file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileLayout {
    /// One JSON record per line (`.jsonl`).
    JsonLines,
    /// A JSON array of records (`.json`).
    JsonArray,
    /// Plain text (`.txt`).
    Text,
}

impl FileLayout {
    pub(crate) fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => Ok(FileLayout::JsonLines),
            Some("json") => Ok(FileLayout::JsonArray),
            Some("txt") => Ok(FileLayout::Text),
            _ => bail!("{}: unsupported data file; expected a .jsonl, .json or .txt file", path.display()),
        }
    }
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expands data paths: a file is taken as is, a folder gives its `.jsonl` / `.json` / `.txt`
/// files (sorted, not recursive), a glob pattern (`data/sft/*.jsonl`) gives its matches (sorted).
/// A file named twice is read once. Errors name the path or pattern that found nothing.
pub fn expand_data_paths<P: AsRef<Path>>(patterns: &[P]) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    let push = |p: PathBuf, out: &mut Vec<PathBuf>| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    if patterns.is_empty() {
        bail!("no data files given");
    }
    for pattern in patterns {
        let pattern = pattern.as_ref();
        if pattern.is_file() {
            FileLayout::of(pattern)?;
            push(pattern.to_path_buf(), &mut out);
            continue;
        }
        if pattern.is_dir() {
            let mut found = Vec::new();
            let entries =
                std::fs::read_dir(pattern).with_context(|| format!("{}: cannot list the folder", pattern.display()))?;
            for entry in entries {
                let path = entry.with_context(|| format!("{}: cannot list the folder", pattern.display()))?.path();
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if path.is_file() && DATA_EXTENSIONS.contains(&ext) {
                    found.push(path);
                }
            }
            if found.is_empty() {
                bail!("{}: the folder holds no .jsonl, .json or .txt files", pattern.display());
            }
            found.sort();
            for p in found {
                push(p, &mut out);
            }
            continue;
        }
        let text = pattern.to_string_lossy();
        if !has_glob_chars(&text) {
            bail!("{}: data file not found", pattern.display());
        }
        let paths = glob::glob(&text).map_err(|e| anyhow::anyhow!("{text}: invalid glob pattern: {e}"))?;
        let mut found = Vec::new();
        for entry in paths {
            let path = entry.map_err(|e| anyhow::anyhow!("{text}: {e}"))?;
            if path.is_file() {
                found.push(path);
            }
        }
        if found.is_empty() {
            bail!("{text}: the pattern matches no files");
        }
        found.sort();
        for p in found {
            FileLayout::of(&p)?;
            push(p, &mut out);
        }
    }
    Ok(out)
}

/// One record of a file before it is interpreted.
#[derive(Debug)]
pub(crate) struct RawRecord {
    pub origin: Origin,
    pub content: RawContent,
}

#[derive(Debug)]
pub(crate) enum RawContent {
    Json(Value),
    /// A `.jsonl` line that is not valid JSON (the parser's message).
    InvalidJson(String),
    Text(String),
}

/// A problem with a whole file (it cannot be read, or a `.json` file is not a JSON array).
#[derive(Debug)]
pub(crate) struct FileProblem {
    pub origin: Origin,
    pub message: String,
}

impl FileProblem {
    pub(crate) fn into_error(self) -> anyhow::Error {
        anyhow::anyhow!("{}: {}", self.origin, self.message)
    }
}

pub(crate) fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Splits a file into raw records. `Err` is an IO error; `Ok(Err(problem))` a file whose
/// structure is broken (reported like an invalid record by `align data check`).
pub(crate) fn raw_records(
    path: &Path,
    layout: FileLayout,
    text_mode: TextMode,
) -> Result<std::result::Result<Vec<RawRecord>, FileProblem>> {
    let content = read_to_string(path)?;
    let content = content.strip_prefix('\u{feff}').unwrap_or(&content);
    Ok(match layout {
        FileLayout::JsonLines => Ok(json_lines(path, content)),
        FileLayout::JsonArray => json_array(path, content),
        FileLayout::Text => Ok(text_documents(path, content, text_mode)),
    })
}

fn json_lines(path: &Path, content: &str) -> Vec<RawRecord> {
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let content = match serde_json::from_str::<Value>(line) {
            Ok(v) => RawContent::Json(v),
            Err(e) => RawContent::InvalidJson(format!("invalid JSON: {e}")),
        };
        out.push(RawRecord { origin: Origin::line(path, i + 1), content });
    }
    out
}

fn text_documents(path: &Path, content: &str, mode: TextMode) -> Vec<RawRecord> {
    match mode {
        TextMode::Line => content
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| RawRecord {
                origin: Origin::line(path, i + 1),
                content: RawContent::Text(line.to_string()),
            })
            .collect(),
        TextMode::File if content.trim().is_empty() => Vec::new(),
        TextMode::File => {
            vec![RawRecord { origin: Origin::line(path, 1), content: RawContent::Text(content.to_string()) }]
        }
    }
}

/// 1-based line of a byte offset.
fn line_at(content: &str, offset: usize) -> usize {
    content.as_bytes()[..offset.min(content.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The items of a `.json` array, each with the line it starts on.
fn json_array(path: &Path, content: &str) -> std::result::Result<Vec<RawRecord>, FileProblem> {
    let problem = |line: usize, message: String| FileProblem { origin: Origin::line(path, line), message };
    // Parse the whole file first so a syntax error is reported where serde_json finds it.
    let whole: Value = serde_json::from_str(content).map_err(|e| problem(e.line(), format!("invalid JSON: {e}")))?;
    let items = match whole {
        Value::Array(items) => items,
        other => {
            return Err(problem(1, format!("expected a JSON array of records, found {}", kind_name(&other))));
        }
    };
    // Find where each item starts: walk the array text value by value.
    let bytes = content.as_bytes();
    let skip_ws = |mut pos: usize| {
        while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        pos
    };
    let mut starts = Vec::with_capacity(items.len());
    let mut pos = skip_ws(0) + 1; // past '['
    for _ in 0..items.len() {
        pos = skip_ws(pos);
        starts.push(pos);
        let mut stream = serde_json::Deserializer::from_str(&content[pos..]).into_iter::<serde::de::IgnoredAny>();
        match stream.next() {
            Some(Ok(_)) => pos += stream.byte_offset(),
            _ => break,
        }
        pos = skip_ws(pos);
        if pos < bytes.len() && bytes[pos] == b',' {
            pos += 1;
        }
    }
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let line = starts.get(i).map(|&s| line_at(content, s)).unwrap_or(1);
            RawRecord {
                origin: Origin { file: path.to_path_buf(), line, array_item: Some(i + 1) },
                content: RawContent::Json(value),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_array_items_know_their_lines() {
        let text = "[\n  {\"a\": 1},\n\n  {\"a\": [1,\n 2]}, {\"a\": \"]\"}\n]\n";
        let recs = json_array(Path::new("x.json"), text).unwrap();
        let lines: Vec<usize> = recs.iter().map(|r| r.origin.line).collect();
        assert_eq!(lines, vec![2, 4, 5]);
        assert_eq!(recs[2].origin.to_string(), "x.json:5 (item 3)");
        let e = json_array(Path::new("x.json"), "{\"a\": 1}").unwrap_err();
        assert_eq!(e.into_error().to_string(), "x.json:1: expected a JSON array of records, found an object");
    }
}
