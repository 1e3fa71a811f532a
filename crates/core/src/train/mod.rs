//! Training: the config schema, AdamW and schedules, the memory plan, loading the model a stage trains, the
//! language-modelling objective, the one training loop and the timing of its phases.
pub mod config;
pub mod lm_objective;
pub mod optim;
pub mod phases;
pub mod plan;
pub mod preference_batch;
pub mod setup;
pub mod trainer;
