//! Evaluations: answers against references (BLEU-4, ROUGE-L, char-F1), reward-model win rate,
//! text metrics.
pub mod answers;
pub mod text_metrics;
pub mod winrate;
