//! Hugging Face folder IO that knows no model: `config.json`, safetensors (single file or
//! shards) read and written by HF names, companion files, durable (fsync'd, atomically renamed) files and folders.
pub mod checkpoint;
pub mod config;
pub mod folder;
