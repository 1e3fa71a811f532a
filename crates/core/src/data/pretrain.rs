//! Pretraining documents from `.txt` files (per line or per file) and `{"text": …}` records.
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::{Map, Value};

use super::fields::{required_string, FieldError, FieldResult};
use super::reader::{read_file, ReadMode};
use super::source::FileLayout;
use super::{DataFormat, DataOptions, Origin, TextMode};

/// One pretraining document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    pub text: String,
    pub origin: Origin,
}

pub(crate) fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Document> {
    match format {
        DataFormat::JsonText => Ok(Document { text: required_string(obj, "text", "")?, origin }),
        other => Err(FieldError::new("", format!("{other} is not a pretraining format"))),
    }
}

/// The documents of one file, `.jsonl` / `.json` by their `text` field and any other extension
/// as plain text; the first invalid record is an error.
pub(crate) fn read_documents_of_file(path: &Path, text_mode: TextMode) -> Result<Vec<Document>> {
    let layout = FileLayout::of(path).unwrap_or(FileLayout::Text);
    let options = DataOptions { text_mode, ..DataOptions::default() };
    let (documents, _) = read_file::<Document>(path, layout, &options, ReadMode::Load)?;
    Ok(documents)
}
