//! `align chat`: an interactive terminal chat with a model — multi-turn history through the
//! model's chat template, answers streamed token by token from the continuous-batching engine,
//! `/reset`, `/system TEXT`, `/exit`; Ctrl-C stops the current answer (at the prompt it exits).
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;

use align_core::eval::answers::stop_token_ids;
use align_core::infer::engine::{Engine, EngineRequest};
use align_core::infer::generate::SamplingConfig;
use align_core::text::chat::ChatMessage;
use align_serve::ChoiceText;

use crate::common::load_session_quantized;
use crate::{ModelArgs, QuantArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// System message at the start of the conversation (`/system TEXT` changes it).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Seed of the first answer's sampling (each later answer uses the next one); default random.
    #[arg(long)]
    pub seed: Option<u64>,
}

const HELP: &str = "commands: /reset (forget the conversation), /system TEXT (set the system message and reset), /exit; Ctrl-C stops an answer";

pub fn run(args: ChatArgs) -> Result<()> {
    if !(args.temperature >= 0.0) {
        bail!("--temperature: expected a number ≥ 0, found {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p: expected a number in (0, 1], found {}", args.top_p);
    }
    let s = load_session_quantized(&args.model, &args.quant)?;
    let tok = &s.tokenizer;
    tok.chat_template()?; // no template: say so before the first message
    let lm = &s.model.lm;
    let context = lm.config.max_position_embeddings.max(1) as usize;
    let eos = stop_token_ids(tok, &lm.config.eos_token_ids);
    let generating = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (generating, interrupted) = (generating.clone(), interrupted.clone());
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                interrupted.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })?;
    }
    let interactive = std::io::stdin().is_terminal();
    let mut system = args.system.clone();
    let mut history: Vec<ChatMessage> = Vec::new();
    let mut turn: u64 = 0;
    let mut entropy =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    eprintln!("align chat with {} — {HELP}", s.model.dir.display());
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            print!("> ");
            out.flush()?;
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(()); // end of input
        }
        let text = line.trim_end_matches(['\n', '\r']);
        let trimmed = text.trim();
        if trimmed.is_empty() {
            continue;
        }
        match trimmed.split_once(' ').map_or((trimmed, ""), |(c, r)| (c, r.trim())) {
            ("/exit", _) | ("/quit", _) => return Ok(()),
            ("/reset", _) => {
                history.clear();
                eprintln!("(conversation reset)");
                continue;
            }
            ("/system", rest) => {
                system = (!rest.is_empty()).then(|| rest.to_string());
                history.clear();
                eprintln!("(system message {}; conversation reset)", if system.is_some() { "set" } else { "removed" });
                continue;
            }
            ("/help", _) => {
                eprintln!("{HELP}");
                continue;
            }
            (c, _) if c.starts_with('/') => {
                eprintln!("unknown command {c}; {HELP}");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", text));
        // the oldest turns leave when the conversation no longer fits the context
        let ids = loop {
            let mut messages = Vec::new();
            if let Some(sys) = &system {
                messages.push(ChatMessage::new("system", sys));
            }
            messages.extend(history.iter().cloned());
            let ids = tok.encode(&tok.apply_chat_template(&messages, true)?, false)?;
            if ids.len() + args.max_new_tokens <= context || history.len() <= 1 {
                break ids;
            }
            history.drain(..2.min(history.len() - 1));
        };
        if ids.len() + args.max_new_tokens > context {
            eprintln!(
                "(the message is {} tokens; with --max-new-tokens {} it does not fit the context of {context})",
                ids.len(),
                args.max_new_tokens
            );
            history.pop();
            continue;
        }
        let sampling = SamplingConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: Some(args.top_p),
            repetition_penalty: args.repetition_penalty,
        };
        let mut request = EngineRequest::new(turn, ids, sampling, eos.clone());
        entropy = entropy.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        request.seed = Some(args.seed.map_or(entropy, |s| s.wrapping_add(turn)));
        turn += 1;
        let mut engine = Engine::new(lm, tok.padding_id());
        let mut reply = ChoiceText::new(Vec::new());
        interrupted.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let result = (|| -> Result<()> {
            engine.admit(vec![request])?;
            while !engine.is_idle() {
                if interrupted.load(Ordering::SeqCst) {
                    engine.cancel(turn - 1);
                    engine.step()?;
                    break;
                }
                for t in engine.step()? {
                    let d = reply.push(tok, &t)?;
                    print!("{}", d.text);
                    out.flush()?;
                }
            }
            Ok(())
        })();
        generating.store(false, Ordering::SeqCst);
        if interrupted.load(Ordering::SeqCst) {
            print!(" [stopped]");
        }
        println!();
        result?;
        history.push(ChatMessage::new("assistant", reply.text()));
    }
}
