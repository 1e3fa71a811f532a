//! Loading a model (+ an optional LoRA adapter) and its tokenizer from CLI flags through the
//! core's one loader, and the `env` report.
use anyhow::Result;
use tch::Device;

use align_core::load::spec::AdapterMode;
use align_core::{LoadedModel, ModelTokenizer};

use crate::{ModelArgs, QuantArgs};

/// A model and its tokenizer, ready on the requested device.
pub struct Session {
    pub model: LoadedModel,
    pub tokenizer: ModelTokenizer,
    pub device: Device,
}

pub fn load_session(args: &ModelArgs) -> Result<Session> {
    load_session_quantized(args, &QuantArgs::default())
}

/// `load_session`, with the base held quantised as `--quantize` says.
pub fn load_session_quantized(args: &ModelArgs, quant: &QuantArgs) -> Result<Session> {
    let spec = args.spec()?.quantized(quant.quantization()?);
    let started = std::time::Instant::now();
    let loaded = spec.causal_lm(AdapterMode::Merge)?;
    let model = loaded.model;
    tracing::info!(
        "loaded {} ({}, {} layers, {} parameters) on {:?} as {:?} in {:.2}s",
        model.dir.display(),
        model.lm.config.model_type.as_str(),
        model.lm.config.num_hidden_layers,
        human_count(model.lm.config.num_parameters()),
        spec.device,
        spec.dtype,
        started.elapsed().as_secs_f64()
    );
    Ok(Session { model, tokenizer: loaded.tokenizer, device: spec.device })
}

pub fn print_env() -> Result<()> {
    println!("align {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads (libtorch intra-op): {}", tch::get_num_threads());
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices: {}", tch::Cuda::device_count());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    Ok(())
}

/// 1234567 → "1.23M".
pub fn human_count(n: i64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
