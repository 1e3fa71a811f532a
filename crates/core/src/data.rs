//! Data readers shared by every stage. Plain-text corpora: `.txt` (one record per non-empty line)
//! and `.jsonl` / `.json` (the `text` field of each record). Errors name the file and line.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// One text record and where it came from (1-based line; for a `.json` array, the item number).
#[derive(Debug, Clone, PartialEq)]
pub struct TextRecord {
    pub text: String,
    pub line: usize,
}

fn text_field(v: &Value, path: &Path, line: usize) -> Result<String> {
    match v.get("text") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!("{}:{line}: field 'text': expected a string, found {}", path.display(), kind_name(other)),
        None => bail!("{}:{line}: field 'text': missing", path.display()),
    }
}

/// A short name of a JSON value's type for error messages.
pub fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads the text records of a `.txt`, `.jsonl` or `.json` file.
pub fn read_text_records(path: &Path) -> Result<Vec<TextRecord>> {
    let content = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut out = Vec::new();
    match ext {
        "jsonl" => {
            for (i, line) in content.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
                out.push(TextRecord { text: text_field(&v, path, i + 1)?, line: i + 1 });
            }
        }
        "json" => {
            let v: Value = serde_json::from_str(&content)
                .map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), e.line()))?;
            let items = v.as_array().ok_or_else(|| {
                anyhow!("{}: expected a JSON array of records, found {}", path.display(), kind_name(&v))
            })?;
            for (i, item) in items.iter().enumerate() {
                out.push(TextRecord { text: text_field(item, path, i + 1)?, line: i + 1 });
            }
        }
        _ => {
            for (i, line) in content.lines().enumerate() {
                if !line.trim().is_empty() {
                    out.push(TextRecord { text: line.to_string(), line: i + 1 });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_txt_and_jsonl_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("a.txt");
        std::fs::write(&txt, "first\n\n  \nsecond\n").unwrap();
        let recs = read_text_records(&txt).unwrap();
        assert_eq!(
            recs,
            vec![TextRecord { text: "first".into(), line: 1 }, TextRecord { text: "second".into(), line: 4 }]
        );
        let jl = dir.path().join("b.jsonl");
        std::fs::write(&jl, "{\"text\":\"ok\"}\n{\"text\":3}\n").unwrap();
        let e = read_text_records(&jl).unwrap_err().to_string();
        assert!(e.ends_with("b.jsonl:2: field 'text': expected a string, found a number"), "{e}");
    }
}
