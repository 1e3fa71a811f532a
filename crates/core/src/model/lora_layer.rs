//! The LoRA layer a decoder linear may carry (`scaling · dropout(x) Aᵀ Bᵀ`, switched off with the
//! model's adapters) and its configuration, PEFT's `LoraConfig` fields (`[lora]` of a stage
//! config). Attaching, merging and PEFT folders are the `peft` room's.
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::decoder::RunMode;

/// `targets` value selecting every projection of the decoder layers (not the LM head), as PEFT's
/// `target_modules = "all-linear"` does.
pub const ALL_LINEAR: &str = "all-linear";

/// LoRA options (the `[lora]` table of a stage config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: i64,
    /// The update is scaled by `alpha / r` (`alpha / √r` with `use_rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input, in training mode only.
    pub dropout: f64,
    /// Which projections get adapters: see [`LoraTargets`].
    pub targets: LoraTargets,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 8, alpha: 16.0, dropout: 0.05, targets: LoraTargets::default(), use_rslora: false }
    }
}

/// `[lora] targets`, PEFT's `target_modules`, read as PEFT reads it. A list selects every module
/// whose path equals one of its names or ends with `.name` (`["q_proj", "v_proj"]`,
/// `["model.layers.0.mlp.up_proj"]`). A string is either `"all-linear"` (every projection of the
/// decoder layers — q, k, v, o, gate, up, down — but not the LM head or a reward model's score
/// head) or a regular expression that must match a whole module path, as PEFT's `re.fullmatch`
/// (in TOML `'model\.layers\.1\..*_proj'`; the Rust `regex` dialect: Python's syntax without
/// look-around or back-references). Only the decoder's projections can be adapted.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraTargets {
    /// Module names or path suffixes. `["all-linear"]` (the form older configs used) means
    /// `"all-linear"`.
    Names(Vec<String>),
    /// `"all-linear"`, or a regular expression full-matched against module paths.
    Pattern(String),
}

impl Default for LoraTargets {
    fn default() -> Self {
        LoraTargets::Pattern(ALL_LINEAR.to_string())
    }
}

impl LoraTargets {
    /// A list of module names.
    pub fn names(names: &[&str]) -> Self {
        LoraTargets::Names(names.iter().map(|n| n.to_string()).collect())
    }

    /// True for `"all-linear"` (PEFT compares it case-insensitively), or a list of just that.
    pub fn is_all_linear(&self) -> bool {
        match self {
            LoraTargets::Pattern(p) => p.eq_ignore_ascii_case(ALL_LINEAR),
            LoraTargets::Names(n) => n.len() == 1 && n[0].eq_ignore_ascii_case(ALL_LINEAR),
        }
    }

    /// The compiled full-match expression of a pattern other than `"all-linear"`.
    pub(crate) fn regex(&self) -> std::result::Result<Option<regex::Regex>, String> {
        match self {
            LoraTargets::Pattern(p) if !self.is_all_linear() => regex::Regex::new(&format!("^(?:{p})$"))
                .map(Some)
                .map_err(|e| format!("{p:?} is not a valid regular expression: {}", e.to_string().replace('\n', " "))),
            _ => Ok(None),
        }
    }

    /// What is wrong with the value, if anything (the caller names the key or field).
    pub(crate) fn problem(&self) -> Option<String> {
        match self {
            LoraTargets::Names(names) => {
                if names.is_empty() {
                    return Some(format!(
                        "expected module names (e.g. [\"q_proj\", \"v_proj\"]) or \"{ALL_LINEAR}\", found []"
                    ));
                }
                if names.iter().any(|t| t.trim().is_empty()) {
                    return Some("empty module name".to_string());
                }
                if names.len() > 1 && names.iter().any(|t| t.eq_ignore_ascii_case(ALL_LINEAR)) {
                    return Some(format!(
                        "\"{ALL_LINEAR}\" selects every projection and cannot be combined with other names"
                    ));
                }
                None
            }
            LoraTargets::Pattern(p) if p.trim().is_empty() => {
                Some(format!("expected \"{ALL_LINEAR}\", a regular expression or a list of module names, found \"\""))
            }
            LoraTargets::Pattern(_) => self.regex().err(),
        }
    }

    /// The module paths among `paths` (a trunk's projections) this selects; every name of a list,
    /// and a pattern, must select at least one.
    pub fn select(&self, paths: &[String]) -> Result<Vec<String>> {
        if let Some(p) = self.problem() {
            bail!("{p}");
        }
        if self.is_all_linear() {
            return Ok(paths.to_vec());
        }
        const NO_OTHERS: &str = "each decoder layer has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and \
                                 down_proj; embeddings and heads such as lm_head or score cannot be adapted";
        match self {
            LoraTargets::Names(targets) => {
                for t in targets {
                    if !paths.iter().any(|n| module_matches(n, t)) {
                        bail!("target '{t}' matches no projection of this model ({NO_OTHERS})");
                    }
                }
                Ok(paths.iter().filter(|n| targets.iter().any(|t| module_matches(n, t))).cloned().collect())
            }
            LoraTargets::Pattern(p) => {
                let re = self.regex().map_err(|e| anyhow!("{e}"))?.ok_or_else(|| anyhow!("no expression"))?;
                let selected: Vec<String> = paths.iter().filter(|n| re.is_match(n)).cloned().collect();
                if selected.is_empty() {
                    bail!(
                        "the regular expression {p:?} matches no projection of this model (it must match a whole \
                         module path such as 'model.layers.0.self_attn.q_proj'; {NO_OTHERS})"
                    );
                }
                Ok(selected)
            }
        }
    }
}

impl Serialize for LoraTargets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            LoraTargets::Names(n) => n.serialize(s),
            LoraTargets::Pattern(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for LoraTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = LoraTargets;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "`targets` as a list of module names (e.g. [\"q_proj\", \"v_proj\"]) or a string (\"{ALL_LINEAR}\" \
                     or a regular expression)"
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<LoraTargets, E> {
                Ok(LoraTargets::Pattern(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<LoraTargets, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(LoraTargets::Names(names))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl LoraConfig {
    /// Checks the ranges of every field; errors name the field (`lora.r`, …).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.r >= 1, "lora.r: expected an integer ≥ 1, found {}", self.r);
        ensure!(self.alpha.is_finite() && self.alpha > 0.0, "lora.alpha: expected a number > 0, found {}", self.alpha);
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora.dropout: expected a probability in [0, 1), found {}",
            self.dropout
        );
        if let Some(p) = self.targets.problem() {
            bail!("lora.targets: {p}");
        }
        Ok(())
    }

    /// The factor of the update: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The low-rank update of one `Linear`: `scaling · dropout(x) Aᵀ Bᵀ`.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub lora_a: Tensor,
    /// `[out, r]`.
    pub lora_b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    pub(crate) mode: Arc<RunMode>,
}

impl LoraAdapter {
    /// False while the model's adapters are disabled.
    pub fn is_enabled(&self) -> bool {
        self.mode.adapters_enabled()
    }

    /// The update for input `x` (computed in the adapter's dtype, returned in `x`'s).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let mut h = if kind == self.lora_a.kind() { x.shallow_clone() } else { x.f_to_kind(self.lora_a.kind())? };
        if self.dropout > 0.0 && self.mode.training() {
            h = h.f_dropout(self.dropout, true)?;
        }
        let y = h
            .f_linear::<Tensor>(&self.lora_a, None)?
            .f_linear::<Tensor>(&self.lora_b, None)?
            .f_mul_scalar(self.scaling)?;
        Ok(if y.kind() == kind { y } else { y.f_to_kind(kind)? })
    }

    /// The same adapter over the same tensors.
    pub(crate) fn shallow_clone(&self) -> Self {
        LoraAdapter {
            lora_a: self.lora_a.shallow_clone(),
            lora_b: self.lora_b.shallow_clone(),
            scaling: self.scaling,
            dropout: self.dropout,
            mode: self.mode.clone(),
        }
    }

    /// `scaling · B A`, `[out, in]`, in the adapter's dtype.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.lora_b.f_matmul(&self.lora_a)?.f_mul_scalar(self.scaling)?)
    }
}

/// True when the module path `path` is `target` or ends with `.target`.
pub(crate) fn module_matches(path: &str, target: &str) -> bool {
    path == target
        || (path.len() > target.len() && path.ends_with(target) && path[..path.len() - target.len()].ends_with('.'))
}
