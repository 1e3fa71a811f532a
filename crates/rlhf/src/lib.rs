//! align-rlhf: preference optimisation of a policy — the DPO family of losses (pure functions of
//! log-probs) and the DPO stage (config, pair batches, objective, reference log-probs); PPO (its
//! maths as pure functions, rollouts, and the stage loop).
pub mod dpo;
pub mod dpo_loss;
pub mod ppo;
pub mod ppo_config;
pub mod ppo_loss;
pub mod reference;
pub mod rollout;

pub use dpo::{run as run_dpo, DpoObjective, DpoSection};
pub use dpo_loss::{dpo_loss, DpoLossOutput, DpoLossParams, DpoLossType, PairLogps};
pub use ppo::run as run_ppo;
pub use ppo_config::PpoSection;
