//! align-core: the one implementation of what every alignment stage shares, in rooms whose
//! imports point one way — `hf` (folder IO, no model) → `text` → `data` → `model` → `peft` →
//! `infer` → `load` → `train` → `eval` (each room imports only rooms before it). See docs/architecture.md.
pub mod data;
pub mod eval;
pub mod hf;
pub mod infer;
pub mod load;
pub mod model;
pub mod peft;
pub mod text;
pub mod train;

/// The data-parallel world of this process (crates/dist: c10d collectives from torchrun's
/// environment), re-exported for the stages and the CLI.
pub use align_dist as dist;
pub use hf::config::ModelConfig;
pub use model::decoder::CausalLm;
pub use model::io::{load_causal_lm, LoadedModel};
pub use text::tokenizer::ModelTokenizer;
