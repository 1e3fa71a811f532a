//! The learned virtual tokens of prompt learning a decoder trunk may carry: prompt tuning's
//! embeddings prepended to the input, or prefix tuning's per-layer keys and values (optionally
//! produced by PEFT's PrefixEncoder MLP). Attaching them and PEFT folders are the `peft` room's.
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The variable names (HF/PEFT style, at the root of the model's `VarStore`).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
pub const ENCODER_EMBEDDING: &str = "prompt_encoder.embedding.weight";
pub const ENCODER_IN_WEIGHT: &str = "prompt_encoder.transform.0.weight";
pub const ENCODER_IN_BIAS: &str = "prompt_encoder.transform.0.bias";
pub const ENCODER_OUT_WEIGHT: &str = "prompt_encoder.transform.2.weight";
pub const ENCODER_OUT_BIAS: &str = "prompt_encoder.transform.2.bias";

/// How prompt tuning's embeddings start (PEFT's `prompt_tuning_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// N(0, 1), as `torch.nn.Embedding` initialises (PEFT's `RANDOM`).
    #[default]
    Random,
    /// The embeddings of `prompt_tuning_init_text`'s tokens (with the tokenizer's special
    /// tokens, as `tokenizer(text)` gives them), repeated or cut to `num_virtual_tokens` (`TEXT`).
    Text,
    /// The embeddings of tokens drawn uniformly from the vocabulary (`SAMPLE_VOCAB`).
    SampleVocab,
}

impl PromptInit {
    /// PEFT's name (`RANDOM`, `TEXT`, `SAMPLE_VOCAB`).
    pub fn peft_name(self) -> &'static str {
        match self {
            PromptInit::Random => "RANDOM",
            PromptInit::Text => "TEXT",
            PromptInit::SampleVocab => "SAMPLE_VOCAB",
        }
    }

    pub fn from_peft_name(name: &str) -> Option<Self> {
        match name {
            "RANDOM" => Some(PromptInit::Random),
            "TEXT" => Some(PromptInit::Text),
            "SAMPLE_VOCAB" => Some(PromptInit::SampleVocab),
            _ => None,
        }
    }
}

/// `[prompt_tuning]`: `num_virtual_tokens` learned embeddings before every sequence (PEFT's
/// `PromptTuningConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: i64,
    #[serde(default)]
    pub prompt_tuning_init: PromptInit,
    /// The text whose token embeddings start the prompt (`prompt_tuning_init = "text"` only).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
}

/// `[prefix_tuning]`: keys and values of `num_virtual_tokens` learned positions in every layer
/// (PEFT's `PrefixTuningConfig`; P-tuning v2), optionally produced during training by PEFT's
/// reparameterisation MLP (`prefix_projection`, hidden width `encoder_hidden_size`, default the
/// key/value width).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixTuningConfig {
    pub num_virtual_tokens: i64,
    #[serde(default)]
    pub prefix_projection: bool,
    #[serde(default)]
    pub encoder_hidden_size: Option<i64>,
}

/// P-tuning's prompt encoder (PEFT's `encoder_reparameterization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EncoderType {
    /// `Linear → ReLU → Linear → ReLU → Linear` (PEFT's `MLP`).
    #[default]
    Mlp,
    /// A bidirectional LSTM of `encoder_num_layers` layers, then `Linear → ReLU → Linear`
    /// (PEFT's `LSTM`).
    Lstm,
}

impl EncoderType {
    pub fn peft_name(self) -> &'static str {
        match self {
            EncoderType::Mlp => "MLP",
            EncoderType::Lstm => "LSTM",
        }
    }
}

/// `[p_tuning]`: prompt tuning whose `num_virtual_tokens` embeddings are produced during training
/// by a prompt encoder (PEFT's `PromptEncoderConfig`, `P_TUNING`) of width
/// `encoder_hidden_size` (default the hidden size); saved, as PEFT saves it, as the encoder's
/// output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PTuningConfig {
    pub num_virtual_tokens: i64,
    #[serde(default)]
    pub encoder_reparameterization_type: EncoderType,
    #[serde(default)]
    pub encoder_hidden_size: Option<i64>,
    /// LSTM layers (LSTM only; PEFT's default 2).
    #[serde(default)]
    pub encoder_num_layers: Option<i64>,
    /// Dropout between LSTM layers (LSTM only; 0, PEFT's default, is what is implemented).
    #[serde(default)]
    pub encoder_dropout: Option<f64>,
}

impl PTuningConfig {
    /// LSTM layers in effect.
    pub fn lstm_layers(&self) -> i64 {
        self.encoder_num_layers.unwrap_or(2)
    }
}

/// Prompt learning attached to a trunk: prompt tuning, P-tuning or prefix tuning.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptLearningConfig {
    PromptTuning(PromptTuningConfig),
    PTuning(PTuningConfig),
    PrefixTuning(PrefixTuningConfig),
}

impl PromptLearningConfig {
    pub fn num_virtual_tokens(&self) -> i64 {
        match self {
            PromptLearningConfig::PromptTuning(c) => c.num_virtual_tokens,
            PromptLearningConfig::PTuning(c) => c.num_virtual_tokens,
            PromptLearningConfig::PrefixTuning(c) => c.num_virtual_tokens,
        }
    }

    /// PEFT's `peft_type`.
    pub fn peft_type(&self) -> &'static str {
        match self {
            PromptLearningConfig::PromptTuning(_) => "PROMPT_TUNING",
            PromptLearningConfig::PTuning(_) => "P_TUNING",
            PromptLearningConfig::PrefixTuning(_) => "PREFIX_TUNING",
        }
    }

    /// The training method (and config section) of this kind: `prompt_tuning`, `p_tuning`,
    /// `prefix_tuning`.
    pub fn method_name(&self) -> &'static str {
        match self {
            PromptLearningConfig::PromptTuning(_) => "prompt_tuning",
            PromptLearningConfig::PTuning(_) => "p_tuning",
            PromptLearningConfig::PrefixTuning(_) => "prefix_tuning",
        }
    }

    /// Checks the values (each error names the key).
    pub fn validate(&self) -> Result<()> {
        let nv = self.num_virtual_tokens();
        ensure!((1..=4096).contains(&nv), "num_virtual_tokens: expected 1..=4096, found {nv}");
        match self {
            PromptLearningConfig::PromptTuning(c) => match (c.prompt_tuning_init, &c.prompt_tuning_init_text) {
                (PromptInit::Text, None) => {
                    bail!("prompt_tuning_init_text: required with prompt_tuning_init = \"text\"")
                }
                (PromptInit::Text, Some(t)) if t.is_empty() => bail!("prompt_tuning_init_text: empty"),
                (PromptInit::Random | PromptInit::SampleVocab, Some(_)) => bail!(
                    "prompt_tuning_init_text: read only with prompt_tuning_init = \"text\" (found \"{}\")",
                    c.prompt_tuning_init.peft_name().to_lowercase()
                ),
                _ => Ok(()),
            },
            PromptLearningConfig::PTuning(c) => {
                if let Some(h) = c.encoder_hidden_size {
                    ensure!(h >= 1, "encoder_hidden_size: expected ≥ 1, found {h}");
                }
                let lstm = c.encoder_reparameterization_type == EncoderType::Lstm;
                if !lstm && (c.encoder_num_layers.is_some() || c.encoder_dropout.is_some()) {
                    bail!("encoder_num_layers / encoder_dropout: read only with encoder_reparameterization_type = \"lstm\" (the MLP has 3 layers, no dropout)");
                }
                if let Some(n) = c.encoder_num_layers {
                    ensure!((1..=8).contains(&n), "encoder_num_layers: expected 1..=8, found {n}");
                }
                if let Some(d) = c.encoder_dropout.filter(|d| *d != 0.0) {
                    bail!("encoder_dropout: only 0 (PEFT's default) is implemented, found {d}");
                }
                Ok(())
            }
            PromptLearningConfig::PrefixTuning(c) => match c.encoder_hidden_size {
                Some(_) if !c.prefix_projection => {
                    bail!("encoder_hidden_size: read only with prefix_projection = true")
                }
                Some(h) if h < 1 => bail!("encoder_hidden_size: expected ≥ 1, found {h}"),
                _ => Ok(()),
            },
        }
    }
}

/// True for the variables prompt learning adds to a model's `VarStore`.
pub fn is_prompt_variable(name: &str) -> bool {
    name == PROMPT_EMBEDDINGS || name.starts_with("prompt_encoder.")
}

/// PEFT's PrefixEncoder with `prefix_projection`: `Embedding → Linear → Tanh → Linear`, whose
/// output `[nv, layers·2·kv_dim]` is the prefix table.
#[derive(Debug)]
pub struct PrefixProjection {
    /// `[nv, kv_dim]` (PEFT's `token_dim`, the key/value width).
    pub embedding: Tensor,
    /// `[encoder_hidden, kv_dim]`, `[encoder_hidden]`.
    pub in_weight: Tensor,
    pub in_bias: Tensor,
    /// `[layers·2·kv_dim, encoder_hidden]`, `[layers·2·kv_dim]`.
    pub out_weight: Tensor,
    pub out_bias: Tensor,
}

impl PrefixProjection {
    fn shallow_clone(&self) -> Self {
        PrefixProjection {
            embedding: self.embedding.shallow_clone(),
            in_weight: self.in_weight.shallow_clone(),
            in_bias: self.in_bias.shallow_clone(),
            out_weight: self.out_weight.shallow_clone(),
            out_bias: self.out_bias.shallow_clone(),
        }
    }

    /// The prefix table `[nv, layers·2·kv_dim]` (with a graph when the weights train).
    pub fn forward(&self) -> Result<Tensor> {
        let h = self.embedding.f_linear(&self.in_weight, Some(&self.in_bias))?.f_tanh()?;
        Ok(h.f_linear(&self.out_weight, Some(&self.out_bias))?)
    }

    /// Every tensor, by variable name.
    pub fn named(&self) -> [(&'static str, &Tensor); 5] {
        [
            (ENCODER_EMBEDDING, &self.embedding),
            (ENCODER_IN_WEIGHT, &self.in_weight),
            (ENCODER_IN_BIAS, &self.in_bias),
            (ENCODER_OUT_WEIGHT, &self.out_weight),
            (ENCODER_OUT_BIAS, &self.out_bias),
        ]
    }
}

/// P-tuning's prompt encoder: PEFT's `prompt_encoder.embedding.weight` `[nv, hidden]` and its
/// head's tensors by variable name (`prompt_encoder.mlp_head.0.weight`, …,
/// `prompt_encoder.lstm_head.weight_ih_l0_reverse`, …), whose output `[nv, hidden]` are the
/// prompt's embeddings.
#[derive(Debug)]
pub struct PromptEncoder {
    pub encoder_type: EncoderType,
    /// LSTM layers (LSTM only).
    pub lstm_layers: i64,
    pub tensors: std::collections::BTreeMap<String, Tensor>,
}

impl PromptEncoder {
    /// The variable names of an encoder of `encoder_type` with `lstm_layers` LSTM layers.
    pub fn names(encoder_type: EncoderType, lstm_layers: i64) -> Vec<String> {
        let mut names = vec![ENCODER_EMBEDDING.to_string()];
        match encoder_type {
            EncoderType::Mlp => {
                for i in [0, 2, 4] {
                    names.push(format!("prompt_encoder.mlp_head.{i}.weight"));
                    names.push(format!("prompt_encoder.mlp_head.{i}.bias"));
                }
            }
            EncoderType::Lstm => {
                for l in 0..lstm_layers {
                    for dir in ["", "_reverse"] {
                        for w in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"] {
                            names.push(format!("prompt_encoder.lstm_head.{w}_l{l}{dir}"));
                        }
                    }
                }
                for i in [0, 2] {
                    names.push(format!("prompt_encoder.mlp_head.{i}.weight"));
                    names.push(format!("prompt_encoder.mlp_head.{i}.bias"));
                }
            }
        }
        names
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| anyhow::anyhow!("prompt encoder: no tensor '{name}'"))
    }

    fn linear(&self, x: &Tensor, i: i64) -> Result<Tensor> {
        let w = self.get(&format!("prompt_encoder.mlp_head.{i}.weight"))?;
        let b = self.get(&format!("prompt_encoder.mlp_head.{i}.bias"))?;
        Ok(x.f_linear(w, Some(b))?)
    }

    /// The prompt's embeddings `[nv, hidden]` (with a graph when the weights train), as PEFT's
    /// `PromptEncoder.forward`.
    pub fn forward(&self) -> Result<Tensor> {
        let x = self.get(ENCODER_EMBEDDING)?;
        match self.encoder_type {
            EncoderType::Mlp => {
                let h = self.linear(x, 0)?.f_relu()?;
                let h = self.linear(&h, 2)?.f_relu()?;
                self.linear(&h, 4)
            }
            EncoderType::Lstm => {
                let hidden = self.get("prompt_encoder.lstm_head.weight_hh_l0")?.size()[1];
                let mut params = Vec::new();
                for l in 0..self.lstm_layers {
                    for dir in ["", "_reverse"] {
                        for w in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"] {
                            params.push(self.get(&format!("prompt_encoder.lstm_head.{w}_l{l}{dir}"))?.shallow_clone());
                        }
                    }
                }
                let zeros = Tensor::f_zeros([2 * self.lstm_layers, 1, hidden], (x.kind(), x.device()))?;
                let hx = [zeros.shallow_clone(), zeros];
                let (out, _, _) =
                    x.f_unsqueeze(0)?.f_lstm(&hx, &params, true, self.lstm_layers, 0.0, false, true, true)?;
                let h = self.linear(&out.f_squeeze_dim(0)?, 0)?.f_relu()?;
                self.linear(&h, 2)
            }
        }
    }

    fn shallow_clone(&self) -> Self {
        PromptEncoder {
            encoder_type: self.encoder_type,
            lstm_layers: self.lstm_layers,
            tensors: self.tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect(),
        }
    }
}

/// Where prefix tuning's table comes from.
#[derive(Debug)]
pub enum PrefixSource {
    /// The table itself (`prompt_embeddings`, `[nv, layers·2·kv_dim]`): PEFT without
    /// `prefix_projection`, or any PEFT prefix folder in inference mode.
    Table(Tensor),
    /// The reparameterisation MLP being trained.
    Projection(PrefixProjection),
}

/// The virtual tokens attached to a trunk. Their weights are kept in f32 (as PEFT keeps its prompt
/// encoder) and cast to the model's dtype in the forward pass.
#[derive(Debug)]
pub enum VirtualTokens {
    /// Prompt tuning: `[nv, hidden]` embeddings prepended to the token embeddings (also
    /// P-tuning's, as saved).
    Prompt(Tensor),
    /// P-tuning while its encoder trains: the encoder's output is prepended.
    Encoded(PromptEncoder),
    /// Prefix tuning: keys and values of `num_virtual_tokens` positions in every layer.
    Prefix { num_virtual_tokens: i64, source: PrefixSource },
}

impl VirtualTokens {
    pub fn num_virtual_tokens(&self) -> i64 {
        match self {
            VirtualTokens::Prompt(e) => e.size()[0],
            VirtualTokens::Encoded(p) => p.tensors.get(ENCODER_EMBEDDING).map_or(0, |e| e.size()[0]),
            VirtualTokens::Prefix { num_virtual_tokens, .. } => *num_virtual_tokens,
        }
    }

    pub fn is_prefix(&self) -> bool {
        matches!(self, VirtualTokens::Prefix { .. })
    }

    pub fn shallow_clone(&self) -> Self {
        match self {
            VirtualTokens::Prompt(e) => VirtualTokens::Prompt(e.shallow_clone()),
            VirtualTokens::Encoded(p) => VirtualTokens::Encoded(p.shallow_clone()),
            VirtualTokens::Prefix { num_virtual_tokens, source } => VirtualTokens::Prefix {
                num_virtual_tokens: *num_virtual_tokens,
                source: match source {
                    PrefixSource::Table(t) => PrefixSource::Table(t.shallow_clone()),
                    PrefixSource::Projection(p) => PrefixSource::Projection(p.shallow_clone()),
                },
            },
        }
    }

    /// Prompt tuning's embeddings for a batch, `[b, nv, hidden]` in `kind`.
    pub fn prompt_embeddings(&self, b: i64, kind: Kind) -> Result<Option<Tensor>> {
        match self {
            VirtualTokens::Prompt(_) | VirtualTokens::Encoded(_) => {
                let e = self
                    .prompt_table()?
                    .ok_or_else(|| anyhow::anyhow!("no prompt embeddings"))?
                    .f_to_kind(kind)?
                    .f_unsqueeze(0)?;
                let size = e.size();
                Ok(Some(e.f_expand([b, size[1], size[2]], false)?))
            }
            VirtualTokens::Prefix { .. } => Ok(None),
        }
    }

    /// Prompt tuning's (and P-tuning's) embeddings `[nv, hidden]` (f32; the saved
    /// `prompt_embeddings`).
    pub fn prompt_table(&self) -> Result<Option<Tensor>> {
        match self {
            VirtualTokens::Prompt(e) => Ok(Some(e.shallow_clone())),
            VirtualTokens::Encoded(p) => Ok(Some(p.forward()?)),
            VirtualTokens::Prefix { .. } => Ok(None),
        }
    }

    /// The prefix table, `[nv, layers·2·kv_dim]` (f32; the saved `prompt_embeddings`).
    pub fn prefix_table(&self) -> Result<Option<Tensor>> {
        match self {
            VirtualTokens::Prompt(_) | VirtualTokens::Encoded(_) => Ok(None),
            VirtualTokens::Prefix { source: PrefixSource::Table(t), .. } => Ok(Some(t.shallow_clone())),
            VirtualTokens::Prefix { source: PrefixSource::Projection(p), .. } => Ok(Some(p.forward()?)),
        }
    }

    /// Prefix tuning's keys and values of every layer, each `[b, kv_heads, nv, head_dim]` in
    /// `kind`, from the table ([`Self::prefix_table`], or `table` when given: the caller's copy of
    /// it).
    pub fn prefix_key_values(
        &self,
        table: Option<&Tensor>,
        b: i64,
        layers: i64,
        kv_heads: i64,
        head_dim: i64,
        kind: Kind,
    ) -> Result<Option<Vec<(Tensor, Tensor)>>> {
        let table = match table {
            Some(t) => t.shallow_clone(),
            None => match self.prefix_table()? {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        split_prefix_table(&table, b, layers, kv_heads, head_dim, kind).map(Some)
    }

    /// True when prefix tuning's table is produced by the projection MLP while it trains.
    pub fn projection_trains(&self) -> bool {
        matches!(self, VirtualTokens::Prefix { source: PrefixSource::Projection(_), .. }) && self.requires_grad()
    }

    /// True when any of the weights trains.
    pub fn requires_grad(&self) -> bool {
        match self {
            VirtualTokens::Prompt(e) => e.requires_grad(),
            VirtualTokens::Encoded(p) => p.tensors.values().any(Tensor::requires_grad),
            VirtualTokens::Prefix { source: PrefixSource::Table(t), .. } => t.requires_grad(),
            VirtualTokens::Prefix { source: PrefixSource::Projection(p), .. } => {
                p.named().iter().any(|(_, t)| t.requires_grad())
            }
        }
    }
}

/// Splits prefix tuning's table `[nv, layers·2·kv_heads·head_dim]` into every layer's keys and
/// values, each `[b, kv_heads, nv, head_dim]` in `kind`, laid out as PEFT's `get_prompt` reshapes
/// it: `view(nv, layers·2, kv_heads, head_dim)`, then layer `i`'s keys are slot `2i` and its
/// values slot `2i + 1`.
pub fn split_prefix_table(
    table: &Tensor,
    b: i64,
    layers: i64,
    kv_heads: i64,
    head_dim: i64,
    kind: Kind,
) -> Result<Vec<(Tensor, Tensor)>> {
    let nv = table.size()[0];
    let want = layers * 2 * kv_heads * head_dim;
    ensure!(
        table.size() == [nv, want],
        "prefix table is {:?}, the model needs [{nv}, {want}] (layers·2·kv_heads·head_dim)",
        table.size()
    );
    // [nv, 2L, H, hd] → [2L, H, nv, hd]
    let kv = table.f_to_kind(kind)?.f_view([nv, 2 * layers, kv_heads, head_dim])?.f_permute([1, 2, 0, 3])?;
    let expand = |t: Tensor| -> Result<Tensor> { Ok(t.f_unsqueeze(0)?.f_expand([b, kv_heads, nv, head_dim], false)?) };
    (0..layers).map(|i| Ok((expand(kv.get(2 * i))?, expand(kv.get(2 * i + 1))?))).collect()
}
