//! Training: the config schema, AdamW and schedules, the memory plan, loading the model a stage trains, the
//! language-modelling objective and the one training loop.
pub mod config;
pub mod lm_objective;
pub mod optim;
pub mod plan;
pub mod preference_batch;
pub mod setup;
pub mod trainer;
