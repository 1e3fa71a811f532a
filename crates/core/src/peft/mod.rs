//! Parameter-efficient tuning in PEFT's format: LoRA layers, attach/disable/merge, adapter
//! folders (read and written as PEFT does), freeze; prompt, P- and prefix tuning (`prompt`); (IA)³ (`ia3`).
pub mod ia3;
pub mod lora;
pub mod models;
pub mod prompt;
