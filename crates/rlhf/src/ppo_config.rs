//! The PPO stage's `[ppo]` section (defaults follow TRL's PPOConfig) and its guardrails.
use serde::{Deserialize, Serialize};

use crate::ppo_loss::KlEstimator;

fn d_rollout() -> usize {
    16
}
fn d_epochs() -> usize {
    4
}
fn d_new_tokens() -> usize {
    128
}
fn d_temperature() -> f64 {
    0.7
}
fn d_one() -> f64 {
    1.0
}
fn d_kl_coef() -> f64 {
    0.05
}
fn d_horizon() -> f64 {
    10000.0
}
fn d_lam() -> f64 {
    0.95
}
fn d_clip() -> f64 {
    0.2
}
fn d_vf_coef() -> f64 {
    0.1
}
fn d_sample_every() -> u64 {
    10
}
fn d_samples() -> usize {
    4
}
fn d_max_kl() -> f64 {
    10.0
}
fn d_min_len() -> f64 {
    2.0
}
fn d_patience() -> u64 {
    3
}

/// `[ppo]`. Defaults follow TRL's PPOConfig where it has the same knob.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    /// Reward model folder (a *ForSequenceClassification model, e.g. the reward stage's output).
    pub reward_model: String,
    /// Critic: "reward_model" (its trunk and head, the default), "policy" (the policy's trunk
    /// with a fresh head), or a model folder.
    #[serde(default)]
    pub value_model: Option<String>,
    /// Reference policy folder (default: the initial policy).
    #[serde(default)]
    pub reference: Option<String>,
    /// Prompts sampled per iteration.
    #[serde(default = "d_rollout")]
    pub rollout_batch_size: usize,
    /// Rows generated together (default: the whole rollout batch).
    #[serde(default)]
    pub generation_batch_size: Option<usize>,
    /// Rollouts per optimizer step (default: the whole rollout batch); `train.batch_size` rows
    /// go through each forward pass.
    #[serde(default)]
    pub mini_batch_size: Option<usize>,
    /// Passes over the rollouts per iteration.
    #[serde(default = "d_epochs")]
    pub ppo_epochs: usize,
    #[serde(default = "d_new_tokens")]
    pub max_new_tokens: usize,
    /// Prompts longer than this (tokens, chat template applied) are dropped and counted
    /// (default: `train.max_length − max_new_tokens`).
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    /// Sampling temperature (> 0); log-probs are taken at the same temperature.
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    #[serde(default = "d_one")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: Option<i64>,
    /// KL penalty coefficient (the starting value when `target_kl` is set).
    #[serde(default = "d_kl_coef")]
    pub kl_coef: f64,
    /// k1 (log-ratio) or k3.
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    /// Adaptive KL control: steer the per-sequence KL towards this target (None = fixed kl_coef).
    #[serde(default)]
    pub target_kl: Option<f64>,
    /// Horizon of the adaptive controller (rollouts).
    #[serde(default = "d_horizon")]
    pub kl_horizon: f64,
    #[serde(default = "d_one")]
    pub gamma: f64,
    #[serde(default = "d_lam")]
    pub lam: f64,
    #[serde(default = "d_clip")]
    pub cliprange: f64,
    #[serde(default = "d_clip")]
    pub cliprange_value: f64,
    /// Weight of the value loss.
    #[serde(default = "d_vf_coef")]
    pub vf_coef: f64,
    /// Critic learning rate (default: `train.lr`; follows the same schedule).
    #[serde(default)]
    pub value_lr: Option<f64>,
    /// Subtracted from the score of a response that did not end with eos.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// Scale the per-token rewards to unit variance before GAE.
    #[serde(default)]
    pub whiten_rewards: bool,
    /// Normalise scores with running mean and standard deviation over all iterations.
    #[serde(default)]
    pub normalize_reward: bool,
    /// Clip (normalised) scores to ±this.
    #[serde(default)]
    pub reward_clip: Option<f64>,
    /// Write prompt/response/score samples to samples.jsonl every N iterations (0 = never).
    #[serde(default = "d_sample_every")]
    pub sample_every: u64,
    #[serde(default = "d_samples")]
    pub num_samples: usize,
    /// Guardrail: per-sequence KL (objective/kl) above this (0 = off).
    #[serde(default = "d_max_kl")]
    pub max_kl: f64,
    /// Guardrail: mean response length below this (tokens; 0 = off).
    #[serde(default = "d_min_len")]
    pub min_response_length: f64,
    /// Iterations in a row a guardrail must trip before it acts.
    #[serde(default = "d_patience")]
    pub guardrail_patience: u64,
    /// Stop the run when a guardrail acts (default: warn only).
    #[serde(default)]
    pub stop_on_guardrail: bool,
}

impl PpoSection {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("rollout_batch_size", self.rollout_batch_size as f64),
            ("ppo_epochs", self.ppo_epochs as f64),
            ("max_new_tokens", self.max_new_tokens as f64),
            ("temperature", self.temperature),
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("kl_horizon", self.kl_horizon),
        ];
        for (key, v) in positive {
            if !(v > 0.0) {
                return Err(format!("{key}: must be > 0, got {v}"));
            }
        }
        if self.rollout_batch_size < 2 {
            return Err("rollout_batch_size: must be at least 2 (advantages are whitened over the batch)".into());
        }
        for (key, v) in
            [("mini_batch_size", self.mini_batch_size), ("generation_batch_size", self.generation_batch_size)]
        {
            if v == Some(0) {
                return Err(format!("{key}: must be > 0"));
            }
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p: must be in (0, 1], got {}", self.top_p));
        }
        for (key, v) in [("gamma", self.gamma), ("lam", self.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{key}: must be in [0, 1], got {v}"));
            }
        }
        if self.kl_coef < 0.0 || self.vf_coef < 0.0 {
            return Err("kl_coef and vf_coef must be ≥ 0".into());
        }
        if let Some(t) = self.target_kl.filter(|t| !(*t > 0.0)) {
            return Err(format!("target_kl: must be > 0, got {t}"));
        }
        if let Some(c) = self.reward_clip.filter(|c| !(*c > 0.0)) {
            return Err(format!("reward_clip: must be > 0, got {c}"));
        }
        Ok(())
    }
}

/// Guardrail counters: iterations in a row each condition has held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Guards {
    pub kl_over: u64,
    pub too_short: u64,
    pub at_max: u64,
}

/// What the guardrails look at after an iteration.
pub struct GuardInputs {
    /// `objective/kl`.
    pub kl: f64,
    pub mean_length: f64,
    /// Every response ran to `max_new_tokens` without eos.
    pub all_at_max: bool,
}

/// Updates the guardrail counters; returns a message when one has held for `guardrail_patience`
/// iterations in a row.
pub fn check_guardrails(s: &PpoSection, g: &mut Guards, r: &GuardInputs) -> Option<String> {
    let bump = |c: &mut u64, on: bool| *c = if on { *c + 1 } else { 0 };
    bump(&mut g.kl_over, s.max_kl > 0.0 && !(r.kl <= s.max_kl));
    bump(&mut g.too_short, s.min_response_length > 0.0 && r.mean_length < s.min_response_length);
    bump(&mut g.at_max, r.all_at_max);
    let k = s.guardrail_patience.max(1);
    if g.kl_over >= k {
        return Some(format!(
            "KL to the reference is {:.3} (> max_kl {}) for {} iterations in a row; raise kl_coef or lower train.lr",
            r.kl, s.max_kl, g.kl_over
        ));
    }
    if g.too_short >= k {
        return Some(format!(
            "mean response length collapsed to {:.2} tokens (< min_response_length {}) for {} iterations in a row",
            r.mean_length, s.min_response_length, g.too_short
        ));
    }
    if g.at_max >= k {
        return Some(format!(
            "every response ran to max_new_tokens ({}) without eos for {} iterations in a row; set missing_eos_penalty?",
            s.max_new_tokens, g.at_max
        ));
    }
    None
}
