//! Text: the tokenizer, chat templates and conversations.
pub mod chat;
pub mod conversation;
pub mod tokenizer;
pub mod tokenizer_train;
