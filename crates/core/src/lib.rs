//! align-core: the one implementation of what every alignment stage shares — model definition,
//! config parsing, checkpoint IO, tokenizer and chat templates, generation, log-probs, devices.
pub mod answer_eval;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod conversation;
pub mod data;
pub mod device;
pub mod generate;
pub mod init;
pub mod lm_objective;
pub mod logprobs;
pub mod lora;
pub mod model;
pub mod optim;
pub mod preference_batch;
pub mod scalar_model;
pub mod text_metrics;
pub mod tokenizer;
pub mod tokenizer_train;
pub mod train_config;
pub mod train_setup;
pub mod trainer;
pub mod winrate;

pub use checkpoint::{load_causal_lm, LoadedModel};
pub use config::ModelConfig;
pub use model::CausalLm;
pub use tokenizer::ModelTokenizer;
