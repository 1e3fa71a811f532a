//! The models: one decoder for the Llama family (trunk + LM head), the scalar-head model (reward
//! and value models), random initialisation, device/dtype selection and causal-LM folder loading.
pub mod decoder;
pub mod device;
pub mod init;
pub mod io;
pub mod lora_layer;
pub mod recompute;
pub mod scalar;
