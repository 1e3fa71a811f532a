//! The models: one decoder for the Llama family (trunk + LM head), the scalar-head model (reward
//! and value models), random initialisation, device/dtype selection, causal-LM folder loading,
//! and quantised weights: 8-bit block-wise (bitsandbytes' maps), 4-bit NF4/FP4 and int8 rows,
//! with the autograd function of a quantised linear and of a LoRA adapter's dropped input; deferred backward passes (activation
//! checkpointing, chunked LM heads).
pub mod blockwise;
pub mod decoder;
pub mod device;
pub mod dropout_linear;
pub(crate) mod ffi;
pub mod ia3_layer;
pub mod init;
pub mod io;
pub mod lora_layer;
pub mod prompt_layer;
pub mod quant;
pub mod quant_linear;
pub mod recompute;
pub mod scalar;
