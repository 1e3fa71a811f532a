//! Hugging Face folder IO that knows no model: `config.json`, safetensors (single file or
//! shards) read and written by HF names, companion files, atomic folder writes.
pub mod checkpoint;
pub mod config;
