//! The models: one decoder for the Llama family (trunk + LM head), the scalar-head model (reward
//! and value models), random initialisation, device/dtype selection, causal-LM folder loading and
//! 8-bit block-wise quantisation (bitsandbytes' maps).
pub mod blockwise;
pub mod decoder;
pub mod device;
pub mod init;
pub mod io;
pub mod lora_layer;
pub mod scalar;
