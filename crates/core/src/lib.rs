//! align-core: the one implementation of what every alignment stage shares — model definition,
//! config parsing, checkpoint IO, tokenizer and chat templates, generation, log-probs, devices.
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod generate;
pub mod logprobs;
pub mod lora;
pub mod model;
pub mod tokenizer;

pub use checkpoint::{load_causal_lm, LoadedModel};
pub use config::ModelConfig;
pub use model::CausalLm;
pub use tokenizer::ModelTokenizer;
