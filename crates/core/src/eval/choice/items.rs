//! Multiple-choice items from the common benchmark layouts: C-Eval / CMMLU (`question`, `A`…`D`,
//! letter `answer`), MMLU (`question`, `choices` list, integer `answer`) and MedQA (`options` map,
//! letter `answer_idx`), in JSONL, JSON arrays or CSV (with a header row; MMLU's header-less
//! `question,A,B,C,D,answer` CSVs too). Every error names the file, the line and the field.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use crate::data::{kind_name, Origin};

/// One question with its options and the index of the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    /// The item's `subject` field, else the file's stem without a `_test`/`_val`/`_dev` suffix.
    pub subject: String,
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
    pub origin: Origin,
}

/// Option labels: `A`, `B`, … (at most 26 options).
pub fn choice_label(i: usize) -> String {
    char::from(b'A' + i as u8).to_string()
}

fn label_index(s: &str, n: usize) -> Option<usize> {
    let s = s.trim();
    let mut chars = s.chars();
    let c = chars.next()?;
    if chars.next().is_some() || !c.is_ascii_uppercase() {
        return None;
    }
    let i = (c as u8 - b'A') as usize;
    (i < n).then_some(i)
}

/// The subject a file's items belong to when they carry none: the file stem without a split
/// suffix (`anatomy_test.csv` → `anatomy`, `basic_medicine_val.jsonl` → `basic_medicine`).
pub fn subject_of_file(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    for suffix in ["_test", "_val", "_validation", "_dev", "_train"] {
        if let Some(s) = stem.strip_suffix(suffix) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    stem
}

/// Looks up a field by name, case-insensitively (CMMLU writes `Question` and `Answer`).
fn field<'a>(record: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    record.get(name).or_else(|| record.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

fn text_of(v: &Value, at: &Origin, name: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => bail!("{at}: field '{name}': expected a string, found {}", kind_name(other)),
    }
}

/// One item of a JSON record in any of the three layouts.
pub fn item_from_record(record: &Map<String, Value>, at: &Origin, default_subject: &str) -> Result<ChoiceItem> {
    let question = field(record, "question")
        .ok_or_else(|| anyhow!("{at}: field 'question': missing (keys: {})", keys_of(record)))
        .and_then(|v| text_of(v, at, "question"))?;
    let subject = match field(record, "subject") {
        Some(v) => text_of(v, at, "subject")?,
        None => default_subject.to_string(),
    };
    let (choices, answer) = if let Some(choices) = field(record, "choices") {
        // MMLU: a list and an integer (or letter) answer
        let list = choices.as_array().ok_or_else(|| {
            anyhow!("{at}: field 'choices': expected a list of strings, found {}", kind_name(choices))
        })?;
        let choices = list
            .iter()
            .enumerate()
            .map(|(i, c)| text_of(c, at, &format!("choices[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let a = field(record, "answer").ok_or_else(|| anyhow!("{at}: field 'answer': missing"))?;
        let answer = match a {
            Value::Number(n) => n.as_u64().map(|i| i as usize).filter(|&i| i < choices.len()),
            Value::String(s) => label_index(s, choices.len()),
            _ => None,
        }
        .ok_or_else(|| {
            anyhow!("{at}: field 'answer': expected an index below {} or a letter, found {a}", choices.len())
        })?;
        (choices, answer)
    } else if let Some(options) = field(record, "options") {
        // MedQA: a map of letters to texts and a letter `answer_idx`
        let map = options.as_object().ok_or_else(|| {
            anyhow!("{at}: field 'options': expected an object of letter → text, found {}", kind_name(options))
        })?;
        let mut choices = Vec::with_capacity(map.len());
        for i in 0..map.len() {
            let label = choice_label(i);
            let v = map.get(&label).ok_or_else(|| {
                anyhow!("{at}: field 'options': expected the keys A, B, … in order, '{label}' is missing")
            })?;
            choices.push(text_of(v, at, &format!("options.{label}"))?);
        }
        let a = field(record, "answer_idx").ok_or_else(|| anyhow!("{at}: field 'answer_idx': missing"))?;
        let answer = label_index(&text_of(a, at, "answer_idx")?, choices.len()).ok_or_else(|| {
            anyhow!("{at}: field 'answer_idx': expected one of A…{}, found {a}", choice_label(choices.len() - 1))
        })?;
        (choices, answer)
    } else {
        // C-Eval / CMMLU: columns A, B, C, D … and a letter answer
        let mut choices = Vec::new();
        while let Some(v) = record.get(&choice_label(choices.len())) {
            choices.push(text_of(v, at, &choice_label(choices.len()))?);
        }
        if choices.is_empty() {
            bail!("{at}: no options: expected 'choices' (MMLU), 'options' (MedQA) or columns A, B, C, D (C-Eval/CMMLU); keys: {}", keys_of(record));
        }
        let a = field(record, "answer").ok_or_else(|| anyhow!("{at}: field 'answer': missing"))?;
        let answer = label_index(&text_of(a, at, "answer")?, choices.len()).ok_or_else(|| {
            anyhow!("{at}: field 'answer': expected one of A…{}, found {a}", choice_label(choices.len() - 1))
        })?;
        (choices, answer)
    };
    if choices.len() < 2 {
        bail!("{at}: expected at least 2 options, found {}", choices.len());
    }
    if choices.len() > 26 {
        bail!("{at}: expected at most 26 options, found {}", choices.len());
    }
    Ok(ChoiceItem { subject, question, choices, answer, origin: at.clone() })
}

fn keys_of(record: &Map<String, Value>) -> String {
    record.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// Reads the items of one `.jsonl`, `.json` (array) or `.csv` file.
pub fn read_choice_file(path: &Path) -> Result<Vec<ChoiceItem>> {
    let subject = subject_of_file(path);
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let mut items = Vec::new();
    match ext.as_str() {
        "jsonl" => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = Origin::line(path, i + 1);
                let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("{at}: invalid JSON: {e}"))?;
                let rec =
                    v.as_object().ok_or_else(|| anyhow!("{at}: expected a JSON object, found {}", kind_name(&v)))?;
                items.push(item_from_record(rec, &at, &subject)?);
            }
        }
        "json" => {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), e.line()))?;
            let arr = v.as_array().ok_or_else(|| {
                anyhow!("{}: expected a JSON array of items, found {}", path.display(), kind_name(&v))
            })?;
            for (i, r) in arr.iter().enumerate() {
                let at = Origin { file: path.to_path_buf(), line: 1, array_item: Some(i + 1) };
                let rec =
                    r.as_object().ok_or_else(|| anyhow!("{at}: expected a JSON object, found {}", kind_name(r)))?;
                items.push(item_from_record(rec, &at, &subject)?);
            }
        }
        "csv" => {
            let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(text.as_bytes());
            let mut rows = reader.records();
            let Some(first) = rows.next() else { return Ok(items) };
            let first = first.map_err(|e| anyhow!("{}:1: invalid CSV: {e}", path.display()))?;
            let named = first.iter().any(|h| h.eq_ignore_ascii_case("question"));
            // MMLU's raw CSVs have no header: question, A, B, C, D, answer
            let header: Vec<String> = if named {
                first.iter().map(str::to_string).collect()
            } else {
                let n = first.len();
                if n < 4 {
                    bail!("{}:1: expected a header row with 'question' or MMLU's question,A,B,C,D,answer columns, found {n} columns", path.display());
                }
                let mut h = vec!["question".to_string()];
                h.extend((0..n - 2).map(choice_label));
                h.push("answer".into());
                h
            };
            let mut push = |row: &csv::StringRecord, line: usize| -> Result<()> {
                let at = Origin::line(path, line);
                if row.len() != header.len() {
                    bail!("{at}: expected {} columns, found {}", header.len(), row.len());
                }
                let mut rec = Map::new();
                for (k, v) in header.iter().zip(row.iter()) {
                    if !k.is_empty() {
                        rec.insert(k.clone(), Value::String(v.to_string()));
                    }
                }
                items.push(item_from_record(&rec, &at, &subject)?);
                Ok(())
            };
            if !named {
                push(&first, 1)?;
            }
            for row in rows {
                let row = row.map_err(|e| {
                    let line = e.position().map_or(0, |p| p.line() as usize);
                    anyhow!("{}:{line}: invalid CSV: {e}", path.display())
                })?;
                let line = row.position().map_or(0, |p| p.line() as usize);
                push(&row, line)?;
            }
        }
        other => bail!("{}: expected a .jsonl, .json or .csv file, found '.{other}'", path.display()),
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_layouts_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let mmlu = dir.path().join("anatomy_test.jsonl");
        std::fs::write(&mmlu, "{\"question\":\"Q1\",\"choices\":[\"a\",\"b\",\"c\",\"d\"],\"answer\":2}\n").unwrap();
        let it = &read_choice_file(&mmlu).unwrap()[0];
        assert_eq!((it.subject.as_str(), it.answer, it.choices.len()), ("anatomy", 2, 4));

        let ceval = dir.path().join("basic_medicine_val.csv");
        std::fs::write(&ceval, "id,question,A,B,C,D,answer,explanation\n0,\"Q, with comma\",w,x,y,z,D,\n").unwrap();
        let it = &read_choice_file(&ceval).unwrap()[0];
        assert_eq!((it.subject.as_str(), it.question.as_str(), it.answer), ("basic_medicine", "Q, with comma", 3));

        let cmmlu = dir.path().join("clinical_knowledge.csv");
        std::fs::write(&cmmlu, ",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,B\n").unwrap();
        assert_eq!(read_choice_file(&cmmlu).unwrap()[0].answer, 1);

        let raw = dir.path().join("virology_dev.csv");
        std::fs::write(&raw, "q,a,b,c,d,C\n").unwrap();
        let it = &read_choice_file(&raw).unwrap()[0];
        assert_eq!((it.subject.as_str(), it.answer, it.choices[3].as_str()), ("virology", 2, "d"));

        let medqa = dir.path().join("medqa.jsonl");
        std::fs::write(
            &medqa,
            "{\"question\":\"Q\",\"options\":{\"A\":\"1\",\"B\":\"2\",\"C\":\"3\",\"D\":\"4\",\"E\":\"5\"},\"answer_idx\":\"E\",\"subject\":\"usmle\"}\n\n{\"question\":\"Q\",\"options\":{\"A\":\"1\",\"C\":\"3\"},\"answer_idx\":\"A\"}\n",
        )
        .unwrap();
        let e = read_choice_file(&medqa).unwrap_err().to_string();
        assert!(
            e.ends_with("medqa.jsonl:3: field 'options': expected the keys A, B, … in order, 'B' is missing"),
            "{e}"
        );

        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"question\":\"Q\",\"A\":\"x\",\"B\":\"y\",\"answer\":\"C\"}\n").unwrap();
        let e = read_choice_file(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:1: field 'answer': expected one of A…B"), "{e}");
    }
}
