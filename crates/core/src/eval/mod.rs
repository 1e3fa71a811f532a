//! Evaluations: answers against references (BLEU-4, ROUGE-L, char-F1), reward-model win rate,
//! multiple-choice benchmarks as lm-evaluation-harness scores them, text metrics.
pub mod answers;
pub mod choice;
pub mod text_metrics;
pub mod winrate;
