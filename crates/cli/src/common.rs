//! Loading a model (+ an optional LoRA adapter) and its tokenizer from CLI flags, and the `env` report.
use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::Device;

use align_core::checkpoint::{load_causal_lm, resolve_model_dir};
use align_core::device::{parse_device, parse_dtype};
use align_core::lora::{load_adapter, merge_lora};
use align_core::{LoadedModel, ModelTokenizer};

use crate::ModelArgs;

/// A model and its tokenizer, ready on the requested device.
pub struct Session {
    pub model: LoadedModel,
    pub tokenizer: ModelTokenizer,
    pub device: Device,
}

pub fn load_session(args: &ModelArgs) -> Result<Session> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(args.dtype.as_deref(), device)?;
    let dir = resolve_model_dir(&args.model)?;
    let started = std::time::Instant::now();
    let mut model = load_causal_lm(&dir, device, kind)?;
    let mut tokenizer_dir = dir.clone();
    if let Some(adapter) = &args.adapter {
        let adapter = PathBuf::from(adapter);
        if !adapter.is_dir() {
            bail!("--adapter {}: no such adapter folder", adapter.display());
        }
        let lora = load_adapter(&model.vs, &mut model.lm, &adapter)?;
        merge_lora(&model.vs, &mut model.lm)?;
        tracing::info!("merged LoRA adapter {} (r {}, alpha {})", adapter.display(), lora.r, lora.alpha);
        // tokenizer files saved with the adapter (e.g. a chat template added in SFT) win
        if adapter.join("tokenizer.json").is_file() {
            tokenizer_dir = adapter;
        }
    }
    let tokenizer = ModelTokenizer::from_dir(&tokenizer_dir)?;
    tracing::info!(
        "loaded {} ({}, {} layers, {} parameters) on {:?} as {:?} in {:.2}s",
        dir.display(),
        model.lm.config.model_type.as_str(),
        model.lm.config.num_hidden_layers,
        human_count(model.lm.config.num_parameters()),
        device,
        kind,
        started.elapsed().as_secs_f64()
    );
    Ok(Session { model, tokenizer, device })
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
