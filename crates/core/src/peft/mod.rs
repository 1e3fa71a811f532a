//! Parameter-efficient tuning in PEFT's format: LoRA layers, attach/disable/merge, adapter
//! folders (read and written as PEFT does), freeze.
pub mod lora;
pub mod models;
