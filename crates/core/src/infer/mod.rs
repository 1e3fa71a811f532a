//! Inference: batched KV-cache generation with sampling and stop tokens (continuous batching in
//! `engine`), token log-probs.
pub mod engine;
pub mod generate;
pub mod logprobs;
