//! Finding data files (paths, folders, glob patterns) and splitting a file into raw records:
//! JSON values of `.jsonl` lines or `.json` array items, or `.txt` documents, each with its origin.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{kind_name, Origin, TextMode};
use crate::hf::folder::utf8_problem;

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
    /// A record that cannot be read: a `.jsonl` line that is not valid JSON (the parser's
    /// message), or a line or `.txt` document that is not UTF-8.
    Invalid(String),
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

/// Splits a file into raw records. `Err` is an IO error; `Ok(Err(problem))` a file whose
/// structure is broken (reported like an invalid record by `align data check`). Lines that are
/// not UTF-8 are invalid records of their own line.
pub(crate) fn raw_records(
    path: &Path,
    layout: FileLayout,
    text_mode: TextMode,
) -> Result<std::result::Result<Vec<RawRecord>, FileProblem>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    Ok(match layout {
        FileLayout::JsonLines => Ok(json_lines(path, bytes)),
        FileLayout::JsonArray => match std::str::from_utf8(bytes) {
            Ok(content) => json_array(path, content),
            Err(e) => {
                let (line, message) = utf8_problem(bytes, &e);
                Err(FileProblem { origin: Origin::line(path, line), message })
            }
        },
        FileLayout::Text => Ok(text_documents(path, bytes, text_mode)),
    })
}

/// The lines of a file (split at `\n`, a trailing `\r` removed, as `str::lines` does), each
/// with its 1-based number, as text or as the message saying why it is not UTF-8.
pub(crate) fn lines_of(bytes: &[u8]) -> impl Iterator<Item = (usize, std::result::Result<&str, String>)> {
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if bytes.ends_with(b"\n") || bytes.is_empty() {
        lines.pop();
    }
    lines.into_iter().enumerate().map(|(i, line)| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        (i + 1, std::str::from_utf8(line).map_err(|e| utf8_problem(line, &e).1))
    })
}

fn json_lines(path: &Path, bytes: &[u8]) -> Vec<RawRecord> {
    let mut out = Vec::new();
    for (number, line) in lines_of(bytes) {
        let content = match line {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => match serde_json::from_str::<Value>(line) {
                Ok(v) => RawContent::Json(v),
                Err(e) => RawContent::Invalid(format!("invalid JSON: {e}")),
            },
            Err(message) => RawContent::Invalid(message),
        };
        out.push(RawRecord { origin: Origin::line(path, number), content });
    }
    out
}

fn text_documents(path: &Path, bytes: &[u8], mode: TextMode) -> Vec<RawRecord> {
    match mode {
        TextMode::Line => lines_of(bytes)
            .filter_map(|(number, line)| {
                let content = match line {
                    Ok(line) if line.trim().is_empty() => return None,
                    Ok(line) => RawContent::Text(line.to_string()),
                    Err(message) => RawContent::Invalid(message),
                };
                Some(RawRecord { origin: Origin::line(path, number), content })
            })
            .collect(),
        TextMode::File => match std::str::from_utf8(bytes) {
            Ok(content) if content.trim().is_empty() => Vec::new(),
            Ok(content) => {
                vec![RawRecord { origin: Origin::line(path, 1), content: RawContent::Text(content.to_string()) }]
            }
            Err(e) => {
                let (line, message) = utf8_problem(bytes, &e);
                vec![RawRecord { origin: Origin::line(path, line), content: RawContent::Invalid(message) }]
            }
        },
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
