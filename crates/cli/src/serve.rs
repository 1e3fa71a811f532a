//! `align serve` (the OpenAI-compatible server with its web console) and `align board` (the
//! console's run dashboard alone): arguments only; the server is `align_serve`.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::QuantArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// Model folder (HF layout) or a hub id present in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// An adapter: `NAME=DIR` serves a LoRA adapter beside the base, selected by the request's
    /// `model` (repeat for several; requests for different adapters share a batch); a plain
    /// `DIR` (one, any PEFT kind) is served as the model itself, as `generate --adapter` loads it.
    #[arg(long = "adapter", value_name = "NAME=DIR | DIR")]
    pub adapters: Vec<String>,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Intra-op CPU threads for libtorch.
    #[arg(long)]
    pub threads: Option<i32>,
    /// Address to bind (loopback by default; give 0.0.0.0 to serve other machines).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the API (default: the ALIGN_API_KEY variable if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; past it the server answers 429 at once.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Context limit (prompt + max_tokens); default the model's max_position_embeddings.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// The base model's id in the API (default: the --model value).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds running requests may take to finish after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Run folders shown on the console's dashboard.
    #[arg(long = "runs", value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let mut single = None;
    let mut named = Vec::new();
    for a in &args.adapters {
        match a.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                named.push((name.to_string(), PathBuf::from(dir)))
            }
            Some(_) => bail!("--adapter {a}: expected NAME=DIR or DIR"),
            None if single.is_none() => single = Some(a.clone()),
            None => bail!("--adapter {a}: only one adapter can be served as the model; name the others (NAME=DIR)"),
        }
    }
    if !(args.shutdown_timeout >= 0.0) {
        bail!("--shutdown-timeout: expected seconds ≥ 0, found {}", args.shutdown_timeout);
    }
    for r in &args.runs {
        crate::existing(r, "run folder")?;
    }
    let api_key = args.api_key.clone().or_else(|| std::env::var("ALIGN_API_KEY").ok().filter(|k| !k.is_empty()));
    align_serve::serve(align_serve::ServeOptions {
        model: args.model.clone(),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        threads: args.threads,
        adapter: single,
        adapters: named,
        quantize: args.quant.quantization()?,
        host: args.host.clone(),
        port: args.port,
        api_key,
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_model_len: args.max_model_len,
        served_model_name: args.served_model_name.clone(),
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
        runs: args.runs.clone(),
    })
}

#[derive(Args)]
pub struct BoardArgs {
    /// Run folders (of `align run`) to show.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8001)]
    pub port: u16,
}

pub fn board(args: BoardArgs) -> Result<()> {
    align_serve::board_page(args.runs, &args.host, args.port)
}
