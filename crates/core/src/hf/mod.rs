//! Hugging Face folder IO that knows no model: `config.json`, safetensors (single file or
//! shards) read and written by HF names, companion files, durable (fsync'd, atomically renamed) files and folders,
//! and the GGUF container (llama.cpp's format) written by name.
pub mod checkpoint;
pub mod config;
pub mod folder;
pub mod gguf;
