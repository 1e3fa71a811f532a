//! Inference: batched KV-cache generation with sampling and stop tokens, token log-probs.
pub mod generate;
pub mod logprobs;
