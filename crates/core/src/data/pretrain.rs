//! Pretraining documents from `.txt` files (per line or per file) and `{"text": …}` records.

use serde::Serialize;
use serde_json::{Map, Value};

use super::fields::{required_string, FieldError, FieldResult};
use super::{DataFormat, Origin};

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
