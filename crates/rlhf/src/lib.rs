//! align-rlhf: preference optimisation of a policy — the DPO family of losses (pure functions of
//! log-probs) and the DPO stage (config, pair batches, objective, reference log-probs).
pub mod dpo;
pub mod dpo_loss;
pub mod ppo_loss;
pub mod reference;

pub use dpo::{run as run_dpo, DpoObjective, DpoSection};
pub use dpo_loss::{dpo_loss, DpoLossOutput, DpoLossParams, DpoLossType, PairLogps};
