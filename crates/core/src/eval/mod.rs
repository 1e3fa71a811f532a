//! Evaluations: answers against references (BLEU-4, ROUGE-L, char-F1, exact match, token F1),
//! reward-model win rate, multiple-choice benchmarks as lm-evaluation-harness scores them,
//! LLM-as-a-judge (rubrics, parsing, the swap rule) and the OpenAI-style endpoint a judge may run
//! behind, summary statistics (mean ± standard error), text metrics.
pub mod answers;
pub mod chat_endpoint;
pub mod choice;
pub mod judge;
pub mod stats;
pub mod text_metrics;
pub mod winrate;
