//! The `[grpo]` / `[rloo]` / `[reinforce_pp]` section (one struct; TRL's GRPOConfig names and
//! defaults where it has the knob) and its checks: a key the chosen estimator or loss would
//! ignore is an error naming it.
use serde::Deserialize;

use crate::grpo_loss::{AdvantageEstimator, ImportanceLevel, LossType, PolicyLossParams, ScaleRewards};
use crate::rewards::RewardSpec;

fn d_generations() -> usize {
    8
}
fn d_generation_batch() -> usize {
    32
}
fn d_one_usize() -> usize {
    1
}
fn d_completion() -> usize {
    256
}
fn d_one() -> f64 {
    1.0
}
fn d_sample_every() -> u64 {
    10
}
fn d_samples() -> usize {
    4
}
fn d_timeout() -> f64 {
    300.0
}

/// `[grpo]` (also read as `[rloo]` and `[reinforce_pp]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// A reward model folder (or LoRA reward adapter), scored like PPO's.
    #[serde(default)]
    pub reward_model: Option<String>,
    #[serde(default)]
    pub reward_model_weight: Option<f64>,
    /// An external reward program (run through `sh -c`): JSON lines in, one number a line out.
    #[serde(default)]
    pub reward_command: Option<String>,
    #[serde(default)]
    pub reward_command_weight: Option<f64>,
    /// Seconds the command may take for one iteration's completions.
    #[serde(default)]
    pub reward_command_timeout: Option<f64>,
    /// Rule-based rewards (`[[grpo.rewards]]`).
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
    /// Reference policy folder (default: the initial policy); only with `beta ≠ 0`.
    #[serde(default)]
    pub reference: Option<String>,
    /// Completions per prompt (G).
    #[serde(default = "d_generations")]
    pub num_generations: usize,
    /// Completions sampled per iteration (a multiple of `num_generations`).
    #[serde(default = "d_generation_batch")]
    pub generation_batch_size: usize,
    /// Completions per optimizer step (default: the whole generation batch); `train.batch_size`
    /// rows go through each forward pass.
    #[serde(default)]
    pub mini_batch_size: Option<usize>,
    /// μ: passes over each generation batch, the rollout log-probs as the old policy.
    #[serde(default = "d_one_usize")]
    pub num_iterations: usize,
    #[serde(default = "d_completion")]
    pub max_completion_length: usize,
    /// Prompts longer than this (tokens) are dropped (default: train.max_length − max_completion_length).
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    #[serde(default = "d_one")]
    pub temperature: f64,
    #[serde(default = "d_one")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: Option<i64>,
    /// KL coefficient (k3, in the loss for GRPO; k1 summed over the sequence and subtracted from
    /// the reward for RLOO / REINFORCE++). Default 0 (GRPO) / 0.05 (RLOO, REINFORCE++); 0 loads no
    /// reference model.
    #[serde(default)]
    pub beta: Option<f64>,
    /// ε_low (default 0.2); not read by `loss_type = "cispo"`.
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// ε_high (default `epsilon`; CISPO's weight cap, default 5.0).
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    #[serde(default)]
    pub loss_type: LossType,
    /// GRPO only: `group` (default), `batch` or `none` (Dr. GRPO).
    #[serde(default)]
    pub scale_rewards: Option<ScaleRewards>,
    /// RLOO only: normalise the advantages over the batch (TRL's `normalize_advantages`).
    #[serde(default)]
    pub normalize_advantages: Option<bool>,
    /// REINFORCE++ only: subtract the group mean before the batch normalisation (-baseline).
    #[serde(default)]
    pub group_baseline: Option<bool>,
    #[serde(default)]
    pub importance_sampling_level: ImportanceLevel,
    /// DAPO's dynamic sampling: groups whose rewards are all equal are left out of the update.
    #[serde(default)]
    pub dynamic_sampling: bool,
    /// Completions that hit max_completion_length without eos are left out of the loss.
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// Rows generated together (default: the whole generation batch).
    #[serde(default)]
    pub generation_chunk_size: Option<usize>,
    /// Write prompt/completion/reward samples to samples.jsonl every N iterations (0 = never).
    #[serde(default = "d_sample_every")]
    pub sample_every: u64,
    #[serde(default = "d_samples")]
    pub num_samples: usize,
}

impl GrpoSection {
    pub fn beta(&self, estimator: AdvantageEstimator) -> f64 {
        self.beta.unwrap_or(if estimator == AdvantageEstimator::Grpo { 0.0 } else { 0.05 })
    }

    pub fn loss_params(&self, estimator: AdvantageEstimator) -> PolicyLossParams {
        let epsilon = self.epsilon.unwrap_or(0.2);
        let default_high = if self.loss_type == LossType::Cispo { 5.0 } else { epsilon };
        PolicyLossParams {
            epsilon_low: epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(default_high),
            beta: if estimator == AdvantageEstimator::Grpo { self.beta(estimator) } else { 0.0 },
            loss_type: self.loss_type,
            level: self.importance_sampling_level,
        }
    }

    /// The estimator's normalisation switch (RLOO's `normalize_advantages`, REINFORCE++'s
    /// `group_baseline`).
    pub fn normalize(&self, estimator: AdvantageEstimator) -> bool {
        match estimator {
            AdvantageEstimator::Grpo => false,
            AdvantageEstimator::Rloo => self.normalize_advantages.unwrap_or(false),
            AdvantageEstimator::ReinforcePp => self.group_baseline.unwrap_or(false),
        }
    }

    /// Checks values and refuses keys the estimator or loss would ignore; the message starts
    /// with the key.
    pub fn validate(&self, estimator: AdvantageEstimator) -> std::result::Result<(), String> {
        let positive = [
            ("num_iterations", self.num_iterations as f64),
            ("max_completion_length", self.max_completion_length as f64),
            ("temperature", self.temperature),
        ];
        for (key, v) in positive {
            if !(v > 0.0) {
                return Err(format!("{key}: must be > 0, got {v}"));
            }
        }
        if self.num_generations < 2 {
            return Err(format!(
                "num_generations: must be at least 2 (advantages compare the completions of a prompt), got {}",
                self.num_generations
            ));
        }
        if self.generation_batch_size == 0 || self.generation_batch_size % self.num_generations != 0 {
            return Err(format!(
                "generation_batch_size: must be a positive multiple of num_generations ({}), got {}",
                self.num_generations, self.generation_batch_size
            ));
        }
        for (key, v) in
            [("mini_batch_size", self.mini_batch_size), ("generation_chunk_size", self.generation_chunk_size)]
        {
            if v == Some(0) {
                return Err(format!("{key}: must be > 0"));
            }
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p: must be in (0, 1], got {}", self.top_p));
        }
        let beta = self.beta(estimator);
        if !(beta >= 0.0 && beta.is_finite()) {
            return Err(format!("beta: must be ≥ 0, got {beta}"));
        }
        if beta == 0.0 && self.reference.is_some() {
            return Err("reference: beta = 0 uses no reference model; set beta > 0 or remove reference".into());
        }
        if self.loss_type == LossType::Cispo && self.epsilon.is_some() {
            return Err("epsilon: loss_type = \"cispo\" has no lower clip (its weight is min(ratio, epsilon_high)); remove epsilon".into());
        }
        let p = self.loss_params(estimator);
        if !(p.epsilon_low > 0.0 && p.epsilon_low < 1.0) && self.loss_type != LossType::Cispo {
            return Err(format!("epsilon: must be in (0, 1), got {}", p.epsilon_low));
        }
        if !(p.epsilon_high > 0.0) {
            return Err(format!("epsilon_high: must be > 0, got {}", p.epsilon_high));
        }
        let only = |key: &str, set: bool, owner: AdvantageEstimator, name: &str| -> std::result::Result<(), String> {
            if set && estimator != owner {
                return Err(format!("{key}: only {name} reads it"));
            }
            Ok(())
        };
        only("scale_rewards", self.scale_rewards.is_some(), AdvantageEstimator::Grpo, "grpo")?;
        only("normalize_advantages", self.normalize_advantages.is_some(), AdvantageEstimator::Rloo, "rloo")?;
        only("group_baseline", self.group_baseline.is_some(), AdvantageEstimator::ReinforcePp, "reinforce_pp")?;
        if self.reward_model_weight.is_some() && self.reward_model.is_none() {
            return Err("reward_model_weight: set without a reward_model".into());
        }
        if (self.reward_command_weight.is_some() || self.reward_command_timeout.is_some())
            && self.reward_command.is_none()
        {
            return Err("reward_command_weight / reward_command_timeout: set without a reward_command".into());
        }
        if let Some(t) = self.reward_command_timeout.filter(|t| !(*t > 0.0)) {
            return Err(format!("reward_command_timeout: must be > 0 seconds, got {t}"));
        }
        if self.reward_command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err("reward_command: empty".into());
        }
        if self.reward_model.is_none() && self.reward_command.is_none() && self.rewards.is_empty() {
            return Err("rewards: no reward given — set reward_model, reward_command or [[rewards]] rules".into());
        }
        for (i, r) in self.rewards.iter().enumerate() {
            r.compile(&format!("rewards[{i}]"), self.max_completion_length).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn command_timeout(&self) -> f64 {
        self.reward_command_timeout.unwrap_or_else(d_timeout)
    }
}
