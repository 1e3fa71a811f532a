//! align-rlhf: preference optimisation of a policy — the DPO family of losses (pure functions of
//! log-probs) and the DPO stage (config, pair batches, objective, reference log-probs); KTO (its
//! loss and stage, on DPO's reference code); knowledge distillation (GKD's divergences and the
//! stage); PPO (its maths as pure functions, rollouts, and its step); GRPO, RLOO and REINFORCE++
//! (one step parameterised by its advantage estimator, its maths as pure functions, and the
//! rewards: reward model, rules, external command).
pub mod distill;
pub mod distill_loss;
pub mod dpo;
pub mod dpo_loss;
pub mod grpo;
pub mod grpo_config;
pub mod grpo_loss;
pub mod kto;
pub mod kto_loss;
pub mod ppo;
pub mod ppo_config;
pub mod ppo_loss;
pub mod reference;
pub mod rewards;
pub mod rollout;

pub use distill::{run as run_distill, DistillObjective, DistillSection};
pub use distill_loss::generalized_jsd;
pub use dpo::{run as run_dpo, DpoObjective, DpoSection};
pub use dpo_loss::{dpo_loss, DpoLossOutput, DpoLossParams, DpoLossType, PairLogps};
pub use grpo::run as run_grpo;
pub use grpo_config::GrpoSection;
pub use kto::{run as run_kto, KtoObjective, KtoSection};
pub use kto_loss::{kto_loss, KtoLogps, KtoLossOutput, KtoLossParams};
pub use ppo::run as run_ppo;
pub use ppo_config::PpoSection;
