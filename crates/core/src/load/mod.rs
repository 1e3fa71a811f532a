//! Putting models together from folders: the one loader (`ModelSpec`) and the one merge path
//! (adapter → merged folder, probe-checked) that every command, stage and the pipeline use, and
//! the GGUF export of a causal-LM folder.
pub mod gguf;
pub mod merge;
pub mod spec;
