//! The LoRA layer a decoder linear may carry (`scaling · dropout(x) Aᵀ Bᵀ`, switched off with the
//! model's adapters) and its configuration, PEFT's `LoraConfig` fields (`[lora]` of a stage
//! config). Attaching, merging and PEFT folders are the `peft` room's.
use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::decoder::RunMode;
use crate::model::dropout_linear::{dropout_linear, dropout_mask};

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
    /// DoRA (PEFT's `use_dora`): the adapted weight is split into a learned magnitude per output
    /// row (`lora_magnitude_vector`) and the direction `W + scaling · B A`.
    pub use_dora: bool,
    /// How fresh adapters start (PEFT's `init_lora_weights`): see [`LoraInit`].
    pub init_lora_weights: LoraInit,
    /// Rank per module (PEFT's `rank_pattern`): a key is a regular expression matched against
    /// the end of a module path after a dot (`"q_proj"`, `'layers\.0\..*'`); modules no key
    /// matches take `r`.
    pub rank_pattern: BTreeMap<String, i64>,
    /// `alpha` per module (PEFT's `alpha_pattern`), keys as in `rank_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Adapt only the projections of these decoder layers (PEFT's `layers_to_transform`; an
    /// integer or a list in a config).
    #[serde(deserialize_with = "layer_indices", skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<i64>>,
    /// LoRA+: `lora_B` (and DoRA's magnitude vectors, as PEFT's `create_loraplus_optimizer`
    /// groups them with the 1-D parameters) train with `lr · loraplus_lr_ratio`. A training
    /// option: not written to `adapter_config.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: LoraTargets::default(),
            use_rslora: false,
            use_dora: false,
            init_lora_weights: LoraInit::Default,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            loraplus_lr_ratio: None,
        }
    }
}

/// `layers_to_transform` as PEFT takes it: one layer index or a list of them.
fn layer_indices<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<i64>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(i64),
        Many(Vec<i64>),
    }
    match Option::<OneOrMany>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("`layers_to_transform`: expected a layer index or a list of them"))?
    {
        None => Ok(None),
        Some(OneOrMany::One(i)) => Ok(Some(vec![i])),
        Some(OneOrMany::Many(v)) => Ok(Some(v)),
    }
}

/// How fresh adapters start: PEFT's `init_lora_weights` (`true`, `"gaussian"`, `"pissa"`,
/// `"olora"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// `true`: `A` kaiming-uniform, `B` zeros (the adapter starts as the identity).
    #[default]
    Default,
    /// `A ~ N(0, 1/r²)` (std `1/r`), `B` zeros.
    Gaussian,
    /// PiSSA: `A`, `B` from the `r` principal singular triplets of `W`
    /// (`B = U_r √(S_r/scaling)`, `A = √(S_r/scaling) V_rᵀ`); the base weight becomes the
    /// residual `W − scaling · B A`, so the model starts unchanged.
    Pissa,
    /// OLoRA: `B = Q[:, :r]`, `A = R[:r]` of the QR decomposition of `W`; the base weight becomes
    /// `W − scaling · B A`.
    Olora,
}

impl LoraInit {
    /// True for the initialisations that move part of the base weight into the adapter.
    pub fn mutates_base(self) -> bool {
        matches!(self, LoraInit::Pissa | LoraInit::Olora)
    }

    /// Reads PEFT's value; `false` (no initialisation) is accepted only when `allow_false`
    /// (an adapter folder, whose weights come from its file).
    pub fn from_json(v: &serde_json::Value, allow_false: bool) -> std::result::Result<Self, String> {
        match v {
            serde_json::Value::Bool(true) => Ok(LoraInit::Default),
            serde_json::Value::Bool(false) if allow_false => Ok(LoraInit::Default),
            serde_json::Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "gaussian" => Ok(LoraInit::Gaussian),
                "pissa" if s == "pissa" => Ok(LoraInit::Pissa),
                "olora" => Ok(LoraInit::Olora),
                _ if s.starts_with("pissa_niter_") => Err(format!(
                    "\"{s}\" (PiSSA through a randomised SVD) is not supported: use \"pissa\" (the exact SVD)"
                )),
                _ => Err(format!("expected true, \"gaussian\", \"pissa\" or \"olora\", found \"{s}\"")),
            },
            other => Err(format!("expected true, \"gaussian\", \"pissa\" or \"olora\", found {other}")),
        }
    }

    /// PEFT's value.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            LoraInit::Default => serde_json::Value::Bool(true),
            LoraInit::Gaussian => "gaussian".into(),
            LoraInit::Pissa => "pissa".into(),
            LoraInit::Olora => "olora".into(),
        }
    }
}

impl Serialize for LoraInit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for LoraInit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        LoraInit::from_json(&v, false).map_err(|e| serde::de::Error::custom(format!("`init_lora_weights`: {e}")))
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
        for (key, r) in &self.rank_pattern {
            pattern_regex(key).map_err(|e| anyhow!("lora.rank_pattern: {e}"))?;
            ensure!(*r >= 1, "lora.rank_pattern: '{key}': expected an integer ≥ 1, found {r}");
        }
        for (key, a) in &self.alpha_pattern {
            pattern_regex(key).map_err(|e| anyhow!("lora.alpha_pattern: {e}"))?;
            ensure!(a.is_finite() && *a > 0.0, "lora.alpha_pattern: '{key}': expected a number > 0, found {a}");
        }
        if let Some(layers) = &self.layers_to_transform {
            ensure!(!layers.is_empty(), "lora.layers_to_transform: expected layer indices, found []");
            if let Some(i) = layers.iter().find(|i| **i < 0) {
                bail!("lora.layers_to_transform: expected layer indices ≥ 0, found {i}");
            }
            if matches!(&self.targets, LoraTargets::Pattern(_)) && !self.targets.is_all_linear() {
                bail!(
                    "lora.layers_to_transform: cannot be combined with a regular expression in lora.targets (as in PEFT); put the layers in the expression"
                );
            }
        }
        if let Some(ratio) = self.loraplus_lr_ratio {
            ensure!(
                ratio.is_finite() && ratio > 0.0,
                "lora.loraplus_lr_ratio: expected a number > 0 (LoRA+ suggests 16), found {ratio}"
            );
        }
        ensure!(
            !(self.use_dora && self.init_lora_weights.mutates_base()),
            "lora.use_dora: cannot be combined with init_lora_weights = {} (DoRA's magnitudes are those of the base weight the initialisation changes)",
            self.init_lora_weights.to_json()
        );
        Ok(())
    }

    /// The factor of the update with rank `r` and `alpha`: `alpha / r`, or `alpha / √r` with
    /// rsLoRA.
    fn scaling_for(&self, r: i64, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The factor of the update of a module without a rank or alpha pattern.
    pub fn scaling(&self) -> f64 {
        self.scaling_for(self.r, self.alpha)
    }

    /// The rank of the adapter on the module at `path` (`rank_pattern`, else `r`).
    pub fn rank_of(&self, path: &str) -> Result<i64> {
        Ok(pattern_value(&self.rank_pattern, path, "rank_pattern")?.copied().unwrap_or(self.r))
    }

    /// The `alpha` of the adapter on the module at `path` (`alpha_pattern`, else `alpha`).
    pub fn alpha_of(&self, path: &str) -> Result<f64> {
        Ok(pattern_value(&self.alpha_pattern, path, "alpha_pattern")?.copied().unwrap_or(self.alpha))
    }

    /// The factor of the update of the module at `path`.
    pub fn scaling_of(&self, path: &str) -> Result<f64> {
        Ok(self.scaling_for(self.rank_of(path)?, self.alpha_of(path)?))
    }

    /// True when the module at `path` (`<trunk>.layers.<i>.…`) lies in a layer
    /// `layers_to_transform` selects (any layer without it).
    pub fn transforms_layer_of(&self, path: &str) -> bool {
        match &self.layers_to_transform {
            None => true,
            Some(layers) => layer_index(path).is_some_and(|i| layers.contains(&i)),
        }
    }

    /// The same adapters: everything but the training-only `loraplus_lr_ratio` and `dropout`
    /// agrees (resuming from, or continuing, an adapter folder).
    pub fn same_adapters(&self, other: &LoraConfig) -> bool {
        let strip = |c: &LoraConfig| LoraConfig { loraplus_lr_ratio: None, dropout: 0.0, ..c.clone() };
        strip(self) == strip(other)
    }
}

/// The layer index of a module path: its first numbered segment after a named one
/// (`model.layers.3.mlp.up_proj` → 3), as PEFT finds it without `layers_pattern`.
fn layer_index(path: &str) -> Option<i64> {
    let parts: Vec<&str> = path.split('.').collect();
    (2..parts.len()).find_map(|i| (i + 1 < parts.len()).then(|| parts[i].parse().ok()).flatten())
}

/// The expression PEFT matches a `rank_pattern` / `alpha_pattern` key with: `(.*\.)?(key)$`
/// from the start of the module path.
fn pattern_regex(key: &str) -> std::result::Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:.*\\.)?(?:{key})$"))
        .map_err(|e| format!("'{key}' is not a valid regular expression: {}", e.to_string().replace('\n', " ")))
}

/// The value of the one key of `map` that matches `path`; two matching keys are an error (PEFT
/// would take the first in the order written, which a table does not keep).
fn pattern_value<'a, V>(map: &'a BTreeMap<String, V>, path: &str, what: &str) -> Result<Option<&'a V>> {
    let mut found: Option<(&String, &V)> = None;
    for (key, v) in map {
        if pattern_regex(key).map_err(|e| anyhow!("lora.{what}: {e}"))?.is_match(path) {
            if let Some((first, _)) = found {
                bail!("lora.{what}: both '{first}' and '{key}' match module '{path}'; make the keys select disjoint modules");
            }
            found = Some((key, v));
        }
    }
    Ok(found.map(|(_, v)| v))
}

/// The low-rank update of one `Linear`: `scaling · dropout(x) Aᵀ Bᵀ`, or with DoRA the
/// magnitude-rescaled output (see [`LoraAdapter::dora_output`]).
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub lora_a: Tensor,
    /// `[out, r]`.
    pub lora_b: Tensor,
    /// DoRA's magnitude per output row, `[out]` (`lora_magnitude_vector`).
    pub magnitude: Option<Tensor>,
    /// PiSSA / OLoRA: the adapter as initialised, `(A₀, B₀)`, frozen, outside the `VarStore`.
    /// The base weight then holds `W − scaling · B₀ A₀`; with the adapters disabled the layer
    /// adds `scaling · B₀ A₀` back, so it computes the base model as loaded.
    pub initial: Option<(Tensor, Tensor)>,
    pub scaling: f64,
    pub dropout: f64,
    pub(crate) mode: Arc<RunMode>,
}

impl LoraAdapter {
    /// False while the model's adapters are disabled.
    pub fn is_enabled(&self) -> bool {
        self.mode.adapters_enabled()
    }

    /// `x` in the adapter's dtype.
    fn in_adapter_kind(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if x.kind() == self.lora_a.kind() { x.shallow_clone() } else { x.f_to_kind(self.lora_a.kind())? })
    }

    /// True when the adapter's dropout applies (training mode, dropout > 0).
    fn drops(&self) -> bool {
        self.dropout > 0.0 && self.mode.training()
    }

    /// `x` in the adapter's dtype, with the adapter's dropout in training mode.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.in_adapter_kind(x)?;
        Ok(if self.drops() { h.f_dropout(self.dropout, true)? } else { h })
    }

    /// The update for input `x` (computed in the adapter's dtype, returned in `x`'s). Under
    /// dropout the first product keeps a boolean mask, not a dropped copy of `x`
    /// ([`dropout_linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let h = self.in_adapter_kind(x)?;
        let xa = if self.drops() {
            dropout_linear(&h, &dropout_mask(&h, self.dropout)?, &self.lora_a, self.dropout)?
        } else {
            h.f_linear::<Tensor>(&self.lora_a, None)?
        };
        let y = xa.f_linear::<Tensor>(&self.lora_b, None)?.f_mul_scalar(self.scaling)?;
        Ok(if y.kind() == kind { y } else { y.f_to_kind(kind)? })
    }

    /// What a disabled PiSSA / OLoRA adapter adds back: `scaling · x A₀ᵀ B₀ᵀ` (None for other
    /// adapters).
    pub fn initial_update(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a0, b0)) = &self.initial else { return Ok(None) };
        let h = if x.kind() == a0.kind() { x.shallow_clone() } else { x.f_to_kind(a0.kind())? };
        let y = h.f_linear::<Tensor>(a0, None)?.f_linear::<Tensor>(b0, None)?.f_mul_scalar(self.scaling)?;
        Ok(Some(if y.kind() == x.kind() { y } else { y.f_to_kind(x.kind())? }))
    }

    /// DoRA (PEFT's `DoraLinearLayer`): with `n = ‖W + scaling · B A‖` per output row (held
    /// constant: no gradient flows through it) and `s = m / n`, the layer computes
    /// `y + (s − 1) · d(x) Wᵀ + s · scaling · d(x) Aᵀ Bᵀ`, where `y = x Wᵀ + b` is the base
    /// output, `d` the adapter's dropout and `d(x) Wᵀ` is taken from `y` when no dropout is
    /// applied. `weight` is the dense base weight `[out, in]`. Returned in `y`'s dtype.
    pub fn dora_output(&self, x: &Tensor, y: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let magnitude = self.magnitude.as_ref().ok_or_else(|| anyhow!("not a DoRA adapter"))?;
        let ak = self.lora_a.kind();
        let dropped = self.drops();
        let h = self.input(x)?;
        let w = if weight.kind() == ak { weight.shallow_clone() } else { weight.f_to_kind(ak)? };
        let norm = self.row_norm(&w, &self.lora_b.f_matmul(&self.lora_a)?.f_detach()?, self.scaling)?.f_detach()?;
        let scale = magnitude.f_div(&norm)?;
        let lora = h.f_linear::<Tensor>(&self.lora_a, None)?.f_linear::<Tensor>(&self.lora_b, None)?;
        let base = if dropped {
            h.f_linear::<Tensor>(&w, None)?
        } else {
            let y = if y.kind() == ak { y.shallow_clone() } else { y.f_to_kind(ak)? };
            match bias {
                Some(b) => y.f_sub(b)?,
                None => y,
            }
        };
        let extra = base.f_mul(&scale.f_sub_scalar(1.0)?)?.f_add(&lora.f_mul(&scale)?.f_mul_scalar(self.scaling)?)?;
        let extra = if extra.kind() == y.kind() { extra } else { extra.f_to_kind(y.kind())? };
        Ok(y.f_add(&extra)?)
    }

    /// `‖W + scaling · delta‖₂` of each output row, `[out]`.
    fn row_norm(&self, w: &Tensor, delta: &Tensor, scaling: f64) -> Result<Tensor> {
        let full = w.f_add(&delta.f_mul_scalar(scaling)?)?;
        Ok(full.f_linalg_norm(2.0, &[1i64][..], false, None::<Kind>)?)
    }

    /// The same adapter over the same tensors.
    pub(crate) fn shallow_clone(&self) -> Self {
        LoraAdapter {
            lora_a: self.lora_a.shallow_clone(),
            lora_b: self.lora_b.shallow_clone(),
            magnitude: self.magnitude.as_ref().map(Tensor::shallow_clone),
            initial: self.initial.as_ref().map(|(a, b)| (a.shallow_clone(), b.shallow_clone())),
            scaling: self.scaling,
            dropout: self.dropout,
            mode: self.mode.clone(),
        }
    }

    /// `scaling · B A`, `[out, in]`, in the adapter's dtype.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.lora_b.f_matmul(&self.lora_a)?.f_mul_scalar(self.scaling)?)
    }

    /// The merged weight of base weight `w` (`[out, in]`, returned in its dtype): `w + scaling·B A`,
    /// with DoRA `m / ‖w + scaling·B A‖ · (w + scaling·B A)` row by row (as PEFT merges it).
    pub fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        let delta = self.delta_weight()?;
        let merged = match &self.magnitude {
            None => w.f_add(&delta.f_to_kind(w.kind())?)?,
            Some(m) => {
                let wf = w.f_to_kind(delta.kind())?;
                let norm = self.row_norm(&wf, &delta, 1.0)?;
                wf.f_add(&delta)?.f_mul(&m.f_div(&norm)?.f_unsqueeze(1)?)?.f_to_kind(w.kind())?
            }
        };
        Ok(merged)
    }
}

/// True when the module path `path` is `target` or ends with `.target`.
pub(crate) fn module_matches(path: &str, target: &str) -> bool {
    path == target
        || (path.len() > target.len() && path.ends_with(target) && path[..path.len() - target.len()].ends_with('.'))
}
