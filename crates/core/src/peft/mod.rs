//! Parameter-efficient tuning in PEFT's format: LoRA layers, attach/disable/merge, adapter
//! folders (read and written as PEFT does), freeze; prompt and prefix tuning (`prompt`).
pub mod lora;
pub mod models;
pub mod prompt;
