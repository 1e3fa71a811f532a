//! Prompt learning in PEFT's format: prompt tuning (`PROMPT_TUNING`: learned embeddings before
//! every sequence), P-tuning (`P_TUNING`: those embeddings produced during training by an MLP or
//! LSTM prompt encoder, saved as its output) and prefix tuning / P-tuning v2 (`PREFIX_TUNING`: learned keys and values of
//! virtual positions in every layer, optionally produced during training by PEFT's
//! reparameterisation MLP). The base model stays frozen; the virtual tokens are the trunk's
//! (`model::prompt_layer`), so every forward pass — training, scoring, cached generation — sees
//! them while adapters are enabled, and none does with adapters disabled (the DPO/PPO reference).
//!
//! The variables live at the root of the model's `VarStore`: `prompt_embeddings` (prompt tuning's
//! `[nv, hidden]`, or prefix tuning's table `[nv, layers·2·kv_dim]`), or PEFT's
//! `prompt_encoder.embedding.weight` / `prompt_encoder.transform.{0,2}.{weight,bias}` while
//! the projection trains. An adapter folder holds what `PeftModel.save_pretrained` writes:
//! `adapter_config.json` and `adapter_model.safetensors` with the one tensor `prompt_embeddings`
//! (the projection's or encoder's output, as PEFT saves it). With a projection or an encoder its weights are also
//! written to `prompt_encoder.safetensors` (PEFT ignores the file), so that a checkpoint resumes
//! training the MLP exactly.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tch::{nn::VarStore, Kind, Tensor};

use crate::hf::checkpoint::for_each_tensor;
use crate::hf::folder::write_folder;
use crate::model::decoder::Trunk;
pub use crate::model::prompt_layer::is_prompt_variable;
pub use crate::model::prompt_layer::{
    EncoderType, PTuningConfig, PrefixProjection, PrefixSource, PrefixTuningConfig, PromptEncoder, PromptInit,
    PromptLearningConfig, PromptTuningConfig, VirtualTokens, PROMPT_EMBEDDINGS,
};
use crate::model::prompt_layer::{
    ENCODER_EMBEDDING, ENCODER_IN_BIAS, ENCODER_IN_WEIGHT, ENCODER_OUT_BIAS, ENCODER_OUT_WEIGHT,
};
pub use crate::peft::lora::adapter_peft_type;
use crate::peft::lora::{
    read_adapter_json, write_adapter_config, write_tensor_file, AdapterSaveOptions, LoraModel, ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE, PEFT_CLASSIFIER_NAMES,
};
use crate::text::tokenizer::ModelTokenizer;

/// The weights of prefix tuning's reparameterisation MLP, beside the PEFT files of a folder.
pub const PROMPT_ENCODER_FILE: &str = "prompt_encoder.safetensors";

/// How PEFT names a module trained in full beside prompt learning in `adapter_model.safetensors`
/// (a reward model's head: `base_model.score.weight`): prompt learning wraps the model itself, so
/// the name has one `base_model.` (LoRA's and (IA)³'s have `base_model.model.`).
const HEAD_PREFIX: &str = "base_model.";

/// The trunk's shape as prompt learning sees it: `(layers, hidden, query heads, kv heads, head_dim)`.
fn shape_of(trunk: &Trunk) -> Result<(i64, i64, i64, i64, i64)> {
    let (heads, kv_heads, head_dim) =
        trunk.attention_heads().ok_or_else(|| anyhow!("the model has no decoder layers"))?;
    let hidden = trunk.embed_tokens.size()[1];
    Ok((trunk.layers.len() as i64, hidden, heads, kv_heads, head_dim))
}

/// PEFT's `token_dim` and `num_attention_heads` for the trunk: the hidden width and the query heads
/// (prompt tuning), the key/value width and heads (prefix tuning: PEFT narrows both to the
/// key/value heads of a grouped-query model).
fn peft_dims(trunk: &Trunk, config: &PromptLearningConfig) -> Result<(i64, i64)> {
    let (_, hidden, heads, kv_heads, head_dim) = shape_of(trunk)?;
    Ok(match config {
        PromptLearningConfig::PromptTuning(_) | PromptLearningConfig::PTuning(_) => (hidden, heads),
        PromptLearningConfig::PrefixTuning(_) => (kv_heads * head_dim, kv_heads),
    })
}

/// Registers `t` (f32, its own storage) as the trainable-or-not variable `name` (dots allowed)
/// at the root of `vs`.
fn add_variable(vs: &VarStore, name: &str, t: Tensor, trainable: bool) -> Tensor {
    let mut parts: Vec<&str> = name.split('.').collect();
    let leaf = parts.pop().unwrap_or(name);
    let mut p = vs.root();
    for seg in parts {
        p = p.sub(seg);
    }
    p.add(leaf, t, trainable)
}

/// `[out, in]` weight and `[out]` bias initialised as `torch.nn.Linear` does (uniform in
/// ±1/√in).
fn linear_init(out: i64, inp: i64, device: tch::Device) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (inp as f64).sqrt();
    let u = |shape: &[i64]| -> Result<Tensor> {
        Ok(Tensor::f_rand(shape, (Kind::Float, device))?.f_mul_scalar(2.0 * bound)?.f_sub_scalar(bound)?)
    };
    Ok((u(&[out, inp])?, u(&[out])?))
}

/// The starting embeddings of prompt tuning `[nv, hidden]` (f32).
fn initial_prompt(trunk: &Trunk, c: &PromptTuningConfig, tokenizer: Option<&ModelTokenizer>) -> Result<Tensor> {
    let nv = c.num_virtual_tokens;
    let emb = &trunk.embed_tokens;
    let (vocab, hidden) = (emb.size()[0], emb.size()[1]);
    let device = emb.device();
    let rows = |ids: Vec<i64>| -> Result<Tensor> {
        let ids = Tensor::from_slice(&ids).to_device(device);
        Ok(emb.f_index_select(0, &ids)?.f_to_kind(Kind::Float)?.f_detach()?.f_contiguous()?)
    };
    match c.prompt_tuning_init {
        PromptInit::Random => Ok(Tensor::f_randn([nv, hidden], (Kind::Float, device))?),
        PromptInit::SampleVocab => {
            rows(Vec::<i64>::try_from(&Tensor::f_randint(vocab, [nv], (Kind::Int64, tch::Device::Cpu))?)?)
        }
        PromptInit::Text => {
            let text = c.prompt_tuning_init_text.as_deref().unwrap_or_default();
            let tok = tokenizer.ok_or_else(|| anyhow!("prompt_tuning_init = \"text\" needs the model's tokenizer"))?;
            let ids = tok.encode(text, true).context("prompt_tuning_init_text")?;
            ensure!(!ids.is_empty(), "prompt_tuning_init_text: {text:?} has no tokens");
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                bail!("prompt_tuning_init_text: token id {bad} is outside the model's {vocab} embeddings");
            }
            // repeated, then cut to nv, as PEFT does
            Ok(rows(ids.iter().copied().cycle().take(nv as usize).collect())?)
        }
    }
}

/// A new P-tuning encoder: the embedding N(0, 1) and the heads as `torch.nn.Linear` /
/// `torch.nn.LSTM` initialise them (uniform in ±1/√fan-in, ±1/√hidden).
fn initial_encoder(c: &PTuningConfig, token_dim: i64, device: tch::Device) -> Result<PromptEncoder> {
    let h = c.encoder_hidden_size.unwrap_or(token_dim);
    let nv = c.num_virtual_tokens;
    let mut tensors = BTreeMap::new();
    tensors.insert(ENCODER_EMBEDDING.to_string(), Tensor::f_randn([nv, token_dim], (Kind::Float, device))?);
    let mut linear = |i: i64, out: i64, inp: i64| -> Result<()> {
        let (w, b) = linear_init(out, inp, device)?;
        tensors.insert(format!("prompt_encoder.mlp_head.{i}.weight"), w);
        tensors.insert(format!("prompt_encoder.mlp_head.{i}.bias"), b);
        Ok(())
    };
    let layers = c.lstm_layers();
    match c.encoder_reparameterization_type {
        EncoderType::Mlp => {
            linear(0, h, token_dim)?;
            linear(2, h, h)?;
            linear(4, token_dim, h)?;
        }
        EncoderType::Lstm => {
            linear(0, 2 * h, 2 * h)?;
            linear(2, token_dim, 2 * h)?;
            let bound = 1.0 / (h as f64).sqrt();
            for l in 0..layers {
                let input = if l == 0 { token_dim } else { 2 * h };
                for dir in ["", "_reverse"] {
                    for (w, shape) in [
                        ("weight_ih", vec![4 * h, input]),
                        ("weight_hh", vec![4 * h, h]),
                        ("bias_ih", vec![4 * h]),
                        ("bias_hh", vec![4 * h]),
                    ] {
                        let t = Tensor::f_rand(shape.as_slice(), (Kind::Float, device))?
                            .f_mul_scalar(2.0 * bound)?
                            .f_sub_scalar(bound)?;
                        tensors.insert(format!("prompt_encoder.lstm_head.{w}_l{l}{dir}"), t);
                    }
                }
            }
        }
    }
    Ok(PromptEncoder { encoder_type: c.encoder_reparameterization_type, lstm_layers: layers, tensors })
}

/// Attaches new prompt learning to `model` (seeded by the caller's `tch::manual_seed`): every
/// variable of the model is frozen except the modules it trains in full (`LoraModel`), and the
/// virtual tokens' variables are added, trainable. `tokenizer` is needed for
/// `prompt_tuning_init = "text"`.
pub fn attach_prompt_learning<M: LoraModel>(
    vs: &VarStore,
    model: &mut M,
    config: &PromptLearningConfig,
    tokenizer: Option<&ModelTokenizer>,
) -> Result<()> {
    config.validate()?;
    let trunk = model.trunk();
    let (layers, _, _, _, _) = shape_of(trunk)?;
    let (token_dim, _) = peft_dims(trunk, config)?;
    let device = trunk.embed_tokens.device();
    let nv = config.num_virtual_tokens();
    let tokens = tch::no_grad(|| -> Result<VirtualTokens> {
        Ok(match config {
            PromptLearningConfig::PromptTuning(c) => VirtualTokens::Prompt(initial_prompt(trunk, c, tokenizer)?),
            PromptLearningConfig::PTuning(c) => VirtualTokens::Encoded(initial_encoder(c, token_dim, device)?),
            PromptLearningConfig::PrefixTuning(c) if c.prefix_projection => {
                let h = c.encoder_hidden_size.unwrap_or(token_dim);
                let embedding = Tensor::f_randn([nv, token_dim], (Kind::Float, device))?;
                let (in_weight, in_bias) = linear_init(h, token_dim, device)?;
                let (out_weight, out_bias) = linear_init(layers * 2 * token_dim, h, device)?;
                VirtualTokens::Prefix {
                    num_virtual_tokens: nv,
                    source: PrefixSource::Projection(PrefixProjection {
                        embedding,
                        in_weight,
                        in_bias,
                        out_weight,
                        out_bias,
                    }),
                }
            }
            PromptLearningConfig::PrefixTuning(_) => VirtualTokens::Prefix {
                num_virtual_tokens: nv,
                source: PrefixSource::Table(Tensor::f_randn([nv, layers * 2 * token_dim], (Kind::Float, device))?),
            },
        })
    })?;
    install(vs, model, config, tokens, true)
}

/// Registers the virtual tokens' tensors as variables of `vs` (trainable or frozen), freezes the
/// rest of the model (but the modules it trains in full, when `trainable`) and attaches them.
fn install<M: LoraModel>(
    vs: &VarStore,
    model: &mut M,
    config: &PromptLearningConfig,
    tokens: VirtualTokens,
    trainable: bool,
) -> Result<()> {
    let trunk = model.trunk();
    ensure!(
        trunk.lora_config().is_none(),
        "LoRA adapters are attached to this model: prompt learning cannot join them"
    );
    ensure!(trunk.virtual_tokens().is_none(), "prompt learning is already attached to this model");
    let vars = vs.variables();
    if let Some(name) = vars.keys().find(|n| is_prompt_variable(n)) {
        bail!("the model already holds the prompt-learning variable '{name}'");
    }
    let full: Vec<Tensor> = model.modules_to_save().into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| -> Result<()> {
        for v in vars.values() {
            let _ = v.shallow_clone().f_requires_grad_(false)?;
        }
        for t in &full {
            let _ = t.shallow_clone().f_requires_grad_(trainable)?;
        }
        Ok(())
    })?;
    let tokens = match tokens {
        VirtualTokens::Prompt(e) => VirtualTokens::Prompt(add_variable(vs, PROMPT_EMBEDDINGS, e, trainable)),
        VirtualTokens::Encoded(p) => VirtualTokens::Encoded(PromptEncoder {
            encoder_type: p.encoder_type,
            lstm_layers: p.lstm_layers,
            tensors: p.tensors.into_iter().map(|(n, t)| (n.clone(), add_variable(vs, &n, t, trainable))).collect(),
        }),
        VirtualTokens::Prefix { num_virtual_tokens, source: PrefixSource::Table(t) } => VirtualTokens::Prefix {
            num_virtual_tokens,
            source: PrefixSource::Table(add_variable(vs, PROMPT_EMBEDDINGS, t, trainable)),
        },
        VirtualTokens::Prefix { num_virtual_tokens, source: PrefixSource::Projection(p) } => {
            let var = |name: &str, t: Tensor| add_variable(vs, name, t, trainable);
            VirtualTokens::Prefix {
                num_virtual_tokens,
                source: PrefixSource::Projection(PrefixProjection {
                    embedding: var(ENCODER_EMBEDDING, p.embedding),
                    in_weight: var(ENCODER_IN_WEIGHT, p.in_weight),
                    in_bias: var(ENCODER_IN_BIAS, p.in_bias),
                    out_weight: var(ENCODER_OUT_WEIGHT, p.out_weight),
                    out_bias: var(ENCODER_OUT_BIAS, p.out_bias),
                }),
            }
        }
    };
    model.trunk_mut().set_virtual_tokens(Some((tokens, config.clone())));
    Ok(())
}

/// What `adapter_model.safetensors` holds: `prompt_embeddings` (prompt tuning's embeddings, or
/// prefix tuning's table — the projection's output while it trains), f32.
fn saved_tensors(trunk: &Trunk) -> Result<BTreeMap<String, Tensor>> {
    let vt = trunk.virtual_tokens().ok_or_else(|| anyhow!("no prompt learning is attached: nothing to save"))?;
    let t = tch::no_grad(|| -> Result<Tensor> {
        let t = match vt {
            VirtualTokens::Prompt(_) | VirtualTokens::Encoded(_) => {
                vt.prompt_table()?.ok_or_else(|| anyhow!("no prompt embeddings"))?
            }
            VirtualTokens::Prefix { .. } => vt.prefix_table()?.ok_or_else(|| anyhow!("no prefix table"))?,
        };
        Ok(t.f_detach()?.f_to_kind(Kind::Float)?.f_contiguous()?)
    })?;
    Ok(BTreeMap::from([(PROMPT_EMBEDDINGS.to_string(), t)]))
}

/// `adapter_config.json` as PEFT 0.21 writes it for prompt or prefix tuning on `model`.
fn peft_config_json<M: LoraModel>(model: &M, config: &PromptLearningConfig, base: Option<&str>) -> Result<Value> {
    let trunk = model.trunk();
    let (layers, ..) = shape_of(trunk)?;
    let (token_dim, heads) = peft_dims(trunk, config)?;
    let mut v = json!({
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "inference_mode": true,
        "modules_to_save": if M::MODULES_TO_SAVE.is_empty() { Value::Null } else { json!(PEFT_CLASSIFIER_NAMES) },
        "num_attention_heads": heads,
        "num_layers": layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens(),
        "peft_type": config.peft_type(),
        "revision": null,
        "task_type": M::PEFT_TASK_TYPE,
        "token_dim": token_dim,
    });
    let obj = v.as_object_mut().expect("an object");
    match config {
        PromptLearningConfig::PromptTuning(c) => {
            let text = c.prompt_tuning_init == PromptInit::Text;
            obj.insert("prompt_tuning_init".into(), json!(c.prompt_tuning_init.peft_name()));
            obj.insert("prompt_tuning_init_text".into(), json!(c.prompt_tuning_init_text));
            obj.insert("tokenizer_kwargs".into(), Value::Null);
            obj.insert("tokenizer_name_or_path".into(), if text { json!(base) } else { Value::Null });
        }
        PromptLearningConfig::PTuning(c) => {
            obj.insert("encoder_dropout".into(), json!(c.encoder_dropout.unwrap_or(0.0)));
            obj.insert("encoder_hidden_size".into(), json!(c.encoder_hidden_size.unwrap_or(token_dim)));
            obj.insert("encoder_num_layers".into(), json!(c.lstm_layers()));
            obj.insert("encoder_reparameterization_type".into(), json!(c.encoder_reparameterization_type.peft_name()));
        }
        PromptLearningConfig::PrefixTuning(c) => {
            obj.insert("encoder_hidden_size".into(), json!(c.encoder_hidden_size.unwrap_or(token_dim)));
            obj.insert("prefix_projection".into(), json!(c.prefix_projection));
        }
    }
    Ok(v)
}

/// Writes the attached prompt learning as a PEFT adapter folder into the existing folder `dir`
/// (`adapter_config.json`, `adapter_model.safetensors`, with a projection or a P-tuning encoder
/// also `prompt_encoder.safetensors`, and the companion files). A reward model's head is saved
/// beside the virtual tokens as PEFT saves a `SEQ_CLS` prompt-learning adapter's
/// (`base_model.score.weight`, `modules_to_save = ["classifier", "score"]`).
pub fn write_prompt_adapter<M: LoraModel>(model: &M, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    let trunk = model.trunk();
    let config =
        trunk.prompt_learning_config().ok_or_else(|| anyhow!("no prompt learning is attached: nothing to save"))?;
    let mut tensors = saved_tensors(trunk)?;
    for (name, t) in model.modules_to_save() {
        tensors.insert(format!("{HEAD_PREFIX}{name}"), t.f_detach()?.f_contiguous()?);
    }
    write_tensor_file(&tensors, dir, ADAPTER_WEIGHTS_FILE)?;
    let encoder: Vec<(String, &Tensor)> = match trunk.virtual_tokens() {
        Some(VirtualTokens::Prefix { source: PrefixSource::Projection(p), .. }) => {
            p.named().iter().map(|(n, t)| (n.to_string(), *t)).collect()
        }
        Some(VirtualTokens::Encoded(p)) => p.tensors.iter().map(|(n, t)| (n.clone(), t)).collect(),
        _ => Vec::new(),
    };
    if !encoder.is_empty() {
        let tensors: BTreeMap<String, Tensor> =
            encoder.into_iter().map(|(n, t)| Ok((n, t.f_detach()?.f_contiguous()?))).collect::<Result<_>>()?;
        write_tensor_file(&tensors, dir, PROMPT_ENCODER_FILE)?;
    }
    let cfg = peft_config_json(model, config, opts.base_model_name_or_path.as_deref())?;
    write_adapter_config(dir, &cfg, opts)
}

/// Saves the attached prompt learning as a PEFT adapter folder, written to a temporary sibling
/// folder and renamed into place when complete.
pub fn save_prompt_adapter<M: LoraModel>(model: &M, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    write_folder(dir, |tmp| write_prompt_adapter(model, tmp, opts))
}

/// True when `dir` is a prompt- or prefix-tuning adapter folder.
pub fn is_prompt_adapter(dir: &Path) -> Result<bool> {
    Ok(matches!(adapter_peft_type(dir)?.as_str(), "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING"))
}

/// A prompt- or prefix-tuning folder's configuration with PEFT's shape fields
/// (`token_dim`, `num_layers`, `num_attention_heads`, when given).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptFolderConfig {
    pub config: PromptLearningConfig,
    pub token_dim: Option<i64>,
    pub num_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub base_model_name_or_path: Option<String>,
}

/// Reads `adapter_config.json` of a PEFT `PROMPT_TUNING`, `P_TUNING` or `PREFIX_TUNING` folder
/// for a model of PEFT task type `task_type` (`CAUSAL_LM`, or `SEQ_CLS` for a reward model, whose
/// `modules_to_save` may name only PEFT's classifier names). Options this implementation does not
/// have (another task type, several transformer submodules, other modules trained in full) are
/// errors naming the field.
pub fn read_prompt_folder_config(dir: &Path, task_type: &str) -> Result<PromptFolderConfig> {
    let obj = read_adapter_json(dir)?;
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let at = path.display();
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let int = |k: &str| -> Result<Option<i64>> {
        field(k)
            .map(|v| {
                v.as_i64()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| anyhow!("{at}: field '{k}': expected an integer ≥ 1, found {v}"))
            })
            .transpose()
    };
    let peft_type = adapter_peft_type(dir)?;
    let reward = task_type == "SEQ_CLS";
    let found = field("task_type").and_then(Value::as_str);
    if reward {
        ensure!(
            found == Some("SEQ_CLS"),
            "{at}: field 'task_type': a reward model takes a \"SEQ_CLS\" prompt-learning adapter (with its score head), found {}",
            field("task_type").map_or("nothing".to_string(), Value::to_string)
        );
    } else if let Some(t) = field("task_type") {
        let hint = if found == Some("SEQ_CLS") {
            " (a reward-model adapter: load it onto the reward model, e.g. with `align eval reward`)"
        } else {
            ""
        };
        ensure!(
            found == Some("CAUSAL_LM"),
            "{at}: field 'task_type': prompt learning is read for causal language models (\"CAUSAL_LM\") and reward models (\"SEQ_CLS\"), found {t}{hint}"
        );
    }
    if let Some(n) = int("num_transformer_submodules")? {
        ensure!(n == 1, "{at}: field 'num_transformer_submodules': a decoder-only model has 1, found {n}");
    }
    if let Some(m) = field("modules_to_save") {
        let names: Option<Vec<&str>> = m.as_array().map(|a| a.iter().filter_map(Value::as_str).collect());
        let ok = match (&names, m.as_array()) {
            (Some(n), Some(a)) if n.len() == a.len() => {
                n.is_empty() || (reward && n.iter().all(|x| PEFT_CLASSIFIER_NAMES.contains(x)))
            }
            _ => false,
        };
        let what = if reward {
            "a reward model trains only its score head in full (\"classifier\", \"score\")"
        } else {
            "modules trained in full beside prompt learning are supported only for a reward model's score head"
        };
        ensure!(ok, "{at}: field 'modules_to_save': {what}, found {m}");
    }
    let nv = int("num_virtual_tokens")?.ok_or_else(|| anyhow!("{at}: field 'num_virtual_tokens': missing"))?;
    let config = match peft_type.as_str() {
        "PROMPT_TUNING" => {
            let init = match field("prompt_tuning_init") {
                None => PromptInit::Random,
                Some(Value::String(s)) => PromptInit::from_peft_name(s).ok_or_else(|| {
                    anyhow!("{at}: field 'prompt_tuning_init': expected \"RANDOM\", \"TEXT\" or \"SAMPLE_VOCAB\", found {s:?}")
                })?,
                Some(v) => bail!("{at}: field 'prompt_tuning_init': expected a string, found {v}"),
            };
            let text = match field("prompt_tuning_init_text") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => bail!("{at}: field 'prompt_tuning_init_text': expected a string, found {v}"),
            };
            // the text only matters when the embeddings are made; a folder keeps it as written
            let text = if init == PromptInit::Text { text } else { None };
            PromptLearningConfig::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: nv,
                prompt_tuning_init: init,
                prompt_tuning_init_text: text,
            })
        }
        "PREFIX_TUNING" => {
            let projection = match field("prefix_projection") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => bail!("{at}: field 'prefix_projection': expected true or false, found {v}"),
            };
            PromptLearningConfig::PrefixTuning(PrefixTuningConfig {
                num_virtual_tokens: nv,
                prefix_projection: projection,
                encoder_hidden_size: if projection { int("encoder_hidden_size")? } else { None },
            })
        }
        "P_TUNING" => {
            let kind = match field("encoder_reparameterization_type") {
                None => EncoderType::Mlp,
                Some(Value::String(s)) if s == "MLP" => EncoderType::Mlp,
                Some(Value::String(s)) if s == "LSTM" => EncoderType::Lstm,
                Some(v) => {
                    bail!("{at}: field 'encoder_reparameterization_type': expected \"MLP\" or \"LSTM\", found {v}")
                }
            };
            let lstm = kind == EncoderType::Lstm;
            let dropout = match field("encoder_dropout") {
                None => None,
                Some(v) => Some(
                    v.as_f64().ok_or_else(|| anyhow!("{at}: field 'encoder_dropout': expected a number, found {v}"))?,
                ),
            };
            let c = PTuningConfig {
                num_virtual_tokens: nv,
                encoder_reparameterization_type: kind,
                encoder_hidden_size: int("encoder_hidden_size")?,
                // PEFT writes its defaults for the MLP too, which ignores them
                encoder_num_layers: if lstm { int("encoder_num_layers")? } else { None },
                encoder_dropout: if lstm { dropout.filter(|d| *d != 0.0) } else { None },
            };
            PromptLearningConfig::PTuning(c)
        }
        other => bail!(
            "{at}: field 'peft_type': expected \"PROMPT_TUNING\", \"P_TUNING\" or \"PREFIX_TUNING\", found \"{other}\""
        ),
    };
    Ok(PromptFolderConfig {
        config,
        token_dim: int("token_dim")?,
        num_layers: int("num_layers")?,
        num_attention_heads: int("num_attention_heads")?,
        base_model_name_or_path: field("base_model_name_or_path").and_then(|v| v.as_str()).map(str::to_string),
    })
}

/// Reads the tensors of `file` into a map by name.
fn read_tensors(file: &Path) -> Result<HashMap<String, Tensor>> {
    if !file.is_file() {
        if file.with_extension("bin").is_file() {
            bail!(
                "{}: only {} found; only safetensors adapters are read",
                file.display(),
                file.with_extension("bin").display()
            );
        }
        bail!("{}: missing (the adapter weights)", file.display());
    }
    let mut out = HashMap::new();
    for_each_tensor(&[file.to_path_buf()], |_, name, t| {
        out.insert(name.to_string(), t.f_to_kind(Kind::Float)?);
        Ok(())
    })?;
    Ok(out)
}

/// Loads a PEFT prompt- or prefix-tuning folder onto `model` (no prompt learning or LoRA
/// attached): the virtual tokens as saved (prefix tuning's table, or — when the folder holds
/// `prompt_encoder.safetensors`, as our checkpoints do — the projection MLP itself), trainable or
/// frozen; the rest of the model frozen. Shapes are checked against the model; errors name the
/// file and the field or tensor. Returns the configuration.
pub fn load_prompt_adapter<M: LoraModel>(
    vs: &VarStore,
    model: &mut M,
    dir: &Path,
    trainable: bool,
) -> Result<PromptLearningConfig> {
    let folder = read_prompt_folder_config(dir, M::PEFT_TASK_TYPE)?;
    let config = folder.config.clone();
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let at = path.display();
    let trunk = model.trunk();
    let (layers, ..) = shape_of(trunk)?;
    let (token_dim, heads) = peft_dims(trunk, &config)?;
    for (field, have, want) in [
        ("token_dim", folder.token_dim, token_dim),
        ("num_layers", folder.num_layers, layers),
        ("num_attention_heads", folder.num_attention_heads, heads),
    ] {
        if let Some(have) = have {
            ensure!(
                have == want,
                "{at}: field '{field}': the adapter has {have} but this base model needs {want}: the adapter was made for a different base model"
            );
        }
    }
    let nv = config.num_virtual_tokens();
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    let encoder_file = dir.join(PROMPT_ENCODER_FILE);
    let projection =
        matches!(&config, PromptLearningConfig::PrefixTuning(c) if c.prefix_projection) && encoder_file.is_file();
    let p_encoder = matches!(&config, PromptLearningConfig::PTuning(_)) && encoder_file.is_file();
    let take = |tensors: &mut HashMap<String, Tensor>, file: &Path, name: &str, shape: &[i64]| -> Result<Tensor> {
        let t = tensors.remove(name).ok_or_else(|| anyhow!("{}: lacks the tensor '{name}'", file.display()))?;
        ensure!(
            t.size() == shape,
            "{}: tensor '{name}' has shape {:?} but this base model needs {shape:?} ({nv} virtual tokens): the adapter was made for a different base model",
            file.display(),
            t.size()
        );
        Ok(t)
    };
    let refuse_rest = |tensors: &HashMap<String, Tensor>, file: &Path| -> Result<()> {
        if let Some(name) = tensors.keys().next() {
            bail!(
                "{}: tensor '{name}': not a weight of {} (expected '{PROMPT_EMBEDDINGS}')",
                file.display(),
                config.peft_type()
            );
        }
        Ok(())
    };
    let tokens = if let (true, PromptLearningConfig::PTuning(c)) = (p_encoder, &config) {
        let mut t = read_tensors(&encoder_file)?;
        let f = encoder_file.as_path();
        let mut tensors = BTreeMap::new();
        tensors.insert(ENCODER_EMBEDDING.to_string(), take(&mut t, f, ENCODER_EMBEDDING, &[nv, token_dim])?);
        for name in PromptEncoder::names(c.encoder_reparameterization_type, c.lstm_layers()).into_iter().skip(1) {
            let v = t.remove(&name).ok_or_else(|| anyhow!("{}: lacks the tensor '{name}'", f.display()))?;
            tensors.insert(name, v);
        }
        refuse_rest(&t, f)?;
        let encoder =
            PromptEncoder { encoder_type: c.encoder_reparameterization_type, lstm_layers: c.lstm_layers(), tensors };
        let out = tch::no_grad(|| encoder.forward()).with_context(|| format!("{}", f.display()))?;
        ensure!(
            out.size() == [nv, token_dim],
            "{}: the encoder gives {:?}, this base model needs [{nv}, {token_dim}]",
            f.display(),
            out.size()
        );
        VirtualTokens::Encoded(encoder)
    } else if projection {
        let mut t = read_tensors(&encoder_file)?;
        let f = encoder_file.as_path();
        let embedding = take(&mut t, f, ENCODER_EMBEDDING, &[nv, token_dim])?;
        let h = t.get(ENCODER_IN_WEIGHT).map_or(token_dim, |w| w.size()[0]);
        let p = PrefixProjection {
            embedding,
            in_weight: take(&mut t, f, ENCODER_IN_WEIGHT, &[h, token_dim])?,
            in_bias: take(&mut t, f, ENCODER_IN_BIAS, &[h])?,
            out_weight: take(&mut t, f, ENCODER_OUT_WEIGHT, &[layers * 2 * token_dim, h])?,
            out_bias: take(&mut t, f, ENCODER_OUT_BIAS, &[layers * 2 * token_dim])?,
        };
        refuse_rest(&t, f)?;
        VirtualTokens::Prefix { num_virtual_tokens: nv, source: PrefixSource::Projection(p) }
    } else {
        let mut t = read_tensors(&weights)?;
        for (name, _) in model.modules_to_save() {
            t.remove(&format!("{HEAD_PREFIX}{name}")); // read below
        }
        let tokens = match &config {
            PromptLearningConfig::PromptTuning(_) | PromptLearningConfig::PTuning(_) => {
                VirtualTokens::Prompt(take(&mut t, &weights, PROMPT_EMBEDDINGS, &[nv, token_dim])?)
            }
            PromptLearningConfig::PrefixTuning(_) => VirtualTokens::Prefix {
                num_virtual_tokens: nv,
                source: PrefixSource::Table(take(&mut t, &weights, PROMPT_EMBEDDINGS, &[nv, layers * 2 * token_dim])?),
            },
        };
        refuse_rest(&t, &weights)?;
        tokens
    };
    let device = model.trunk().embed_tokens.device();
    let tokens = match tokens {
        VirtualTokens::Prompt(e) => VirtualTokens::Prompt(e.f_to_device(device)?),
        VirtualTokens::Encoded(p) => VirtualTokens::Encoded(PromptEncoder {
            encoder_type: p.encoder_type,
            lstm_layers: p.lstm_layers,
            tensors: p.tensors.into_iter().map(|(n, t)| Ok((n, t.f_to_device(device)?))).collect::<Result<_>>()?,
        }),
        VirtualTokens::Prefix { num_virtual_tokens, source: PrefixSource::Table(t) } => {
            VirtualTokens::Prefix { num_virtual_tokens, source: PrefixSource::Table(t.f_to_device(device)?) }
        }
        VirtualTokens::Prefix { num_virtual_tokens, source: PrefixSource::Projection(p) } => VirtualTokens::Prefix {
            num_virtual_tokens,
            source: PrefixSource::Projection(PrefixProjection {
                embedding: p.embedding.f_to_device(device)?,
                in_weight: p.in_weight.f_to_device(device)?,
                in_bias: p.in_bias.f_to_device(device)?,
                out_weight: p.out_weight.f_to_device(device)?,
                out_bias: p.out_bias.f_to_device(device)?,
            }),
        },
    };
    install(vs, model, &config, tokens, trainable).with_context(|| format!("{at}"))?;
    load_heads(model, &weights)?;
    Ok(config)
}

/// Copies the weights of the modules `model` trains in full (a reward model's `score` head) from
/// a prompt-learning folder's `adapter_model.safetensors` (`base_model.score.weight`, as PEFT
/// saves them) into the model; every one must be there with the model's shape.
fn load_heads<M: LoraModel>(model: &M, weights: &Path) -> Result<()> {
    let heads = model.modules_to_save();
    if heads.is_empty() {
        return Ok(());
    }
    let mut t = read_tensors(weights)?;
    tch::no_grad(|| -> Result<()> {
        for (name, var) in heads {
            let key = format!("{HEAD_PREFIX}{name}");
            let w = t.remove(&key).ok_or_else(|| {
                anyhow!(
                    "{}: lacks the tensor '{key}' (the reward model's head, PEFT's modules_to_save)",
                    weights.display()
                )
            })?;
            ensure!(
                w.size() == var.size(),
                "{}: tensor '{key}' has shape {:?} but this model's head is {:?}: the adapter was made for a different base model",
                weights.display(),
                w.size(),
                var.size()
            );
            var.shallow_clone().f_copy_(&w.f_to_kind(var.kind())?)?;
        }
        Ok(())
    })
}

/// Copies the prompt-learning tensors of a folder our checkpoints wrote into the variables
/// already attached (resume of the same run): `prompt_embeddings` from `adapter_model.safetensors`
/// when the model holds it as a variable, the projection's weights from
/// `prompt_encoder.safetensors` when it holds those, a reward model's head
/// (`base_model.score.weight`). Every trainable variable must be restored.
pub fn restore_prompt_weights(vs: &VarStore, dir: &Path) -> Result<()> {
    let vars = vs.variables();
    let mut seen = HashSet::new();
    for file in [dir.join(ADAPTER_WEIGHTS_FILE), dir.join(PROMPT_ENCODER_FILE)] {
        if !file.is_file() {
            continue;
        }
        for (key, t) in read_tensors(&file)? {
            // a reward model's head is saved as `base_model.score.weight`
            let name = match key.strip_prefix(HEAD_PREFIX) {
                Some(head) if !is_prompt_variable(&key) => head.to_string(),
                _ => key,
            };
            // prefix tuning's saved table is the projection's output, not a variable then
            let trains = |v: &Tensor| is_prompt_variable(&name) || v.requires_grad();
            let Some(var) = vars.get(&name).filter(|v| trains(v)) else { continue };
            ensure!(
                var.size() == t.size(),
                "{}: '{name}' has shape {:?}, the model's variable {:?}",
                file.display(),
                t.size(),
                var.size()
            );
            tch::no_grad(|| var.shallow_clone().f_copy_(&t))?;
            seen.insert(name);
        }
    }
    let mut missing: Vec<&String> = vars
        .iter()
        .filter(|(k, v)| (is_prompt_variable(k) || v.requires_grad()) && !seen.contains(*k))
        .map(|(k, _)| k)
        .collect();
    missing.sort();
    ensure!(missing.is_empty(), "{}: lacks tensors {missing:?}", dir.display());
    Ok(())
}

/// Number of values of the attached virtual tokens' variables (0 without prompt learning).
pub fn prompt_parameter_count(trunk: &Trunk) -> i64 {
    match trunk.virtual_tokens() {
        None => 0,
        Some(VirtualTokens::Prompt(e)) => e.numel() as i64,
        Some(VirtualTokens::Encoded(p)) => p.tensors.values().map(|t| t.numel() as i64).sum(),
        Some(VirtualTokens::Prefix { source: PrefixSource::Table(t), .. }) => t.numel() as i64,
        Some(VirtualTokens::Prefix { source: PrefixSource::Projection(p), .. }) => {
            p.named().iter().map(|(_, t)| t.numel() as i64).sum()
        }
    }
}
