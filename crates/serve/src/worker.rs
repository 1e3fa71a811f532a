//! The model's thread: owns the loaded model and the continuous-batching engine, takes jobs
//! from the HTTP handlers, admits them between decode steps while the batch has room, and
//! sends every token back on the job's channel. A job whose client went away (its channel
//! closed) or whose choice hit a stop string leaves the batch at the next step. An error or a
//! panic inside the engine fails the jobs of that batch, never the server.
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use align_core::infer::engine::{Engine, EngineRequest, StepToken, TokenLogprob};
use align_core::model::decoder::CausalLm;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// What the worker sends back for one job.
#[derive(Debug)]
pub enum Event {
    /// Log-probabilities of the prompt's tokens after the first (when asked for).
    Prompt(Vec<TokenLogprob>),
    Token {
        choice: usize,
        step: StepToken,
    },
    /// The batch failed; the job gets no more tokens.
    Failed(String),
}

/// Frees one place of the server's request limit when the job is dropped (finished, cancelled
/// or failed).
pub struct Slot(pub Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request to generate `n` choices of the same prompt: `request` is each choice's engine
/// request (the worker gives every choice its own id and seed: `seed + i`, or a random one).
pub struct Job {
    pub request: EngineRequest,
    pub n: usize,
    /// Set by the handler when a choice is done early (stop string).
    pub stopped: Arc<Vec<AtomicBool>>,
    pub events: UnboundedSender<Event>,
    /// Held until the job is dropped.
    pub _slot: Slot,
}

struct Running {
    job: Job,
    /// Engine ids of the choices still generating.
    rows: Vec<Option<u64>>,
}

/// Runs until the job channel closes (every sender dropped) or `shutdown` is set and no job is
/// left.
pub fn run(
    lm: &CausalLm,
    pad_id: i64,
    max_batch: usize,
    jobs: Receiver<Job>,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
) {
    let mut engine = Engine::new(lm, pad_id);
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut running: HashMap<u64, Running> = HashMap::new();
    // engine id → (job key, choice)
    let mut rows: HashMap<u64, (u64, usize)> = HashMap::new();
    let next_id = AtomicU64::new(0);
    let mut entropy = Instant::now().elapsed().as_nanos() as u64 ^ 0x5DEE_CE66_D1CE_4E5B;
    loop {
        if engine.is_idle() && pending.is_empty() {
            match jobs.recv_timeout(Duration::from_millis(50)) {
                Ok(job) => pending.push_back(job),
                Err(RecvTimeoutError::Timeout) => {
                    if shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            pending.push_back(job);
        }
        // clients gone, choices stopped: those rows leave
        let mut done = Vec::new();
        for (key, r) in running.iter_mut() {
            let gone = r.job.events.is_closed();
            for (choice, row) in r.rows.iter_mut().enumerate() {
                if row.is_some() && (gone || r.job.stopped[choice].load(Ordering::SeqCst)) {
                    if let Some(id) = row.take() {
                        engine.cancel(id);
                        rows.remove(&id);
                    }
                }
            }
            if r.rows.iter().all(Option::is_none) {
                done.push(*key);
            }
        }
        for key in done {
            running.remove(&key);
        }
        pending.retain(|j| !j.events.is_closed());

        // admit what fits
        let mut group = Vec::new();
        let mut rows_after = engine.running();
        while let Some(job) = pending.front() {
            if rows_after + job.n > max_batch && rows_after > 0 {
                break;
            }
            let Some(job) = pending.pop_front() else { break };
            rows_after += job.n;
            let key = next_id.fetch_add(1, Ordering::SeqCst);
            let mut ids = Vec::with_capacity(job.n);
            for choice in 0..job.n {
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                let mut r = job.request.clone();
                r.id = id;
                entropy = entropy.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                r.seed = Some(job.request.seed.map_or(entropy, |s| s.wrapping_add(choice as u64)));
                // the prompt is scored once per job
                if choice > 0 {
                    r.prompt_logprobs = None;
                }
                rows.insert(id, (key, choice));
                ids.push(Some(id));
                group.push(r);
            }
            running.insert(key, Running { job, rows: ids });
        }
        metrics.queue_depth.store(pending.len(), Ordering::Relaxed);

        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(
            || -> anyhow::Result<(Vec<(u64, Vec<TokenLogprob>)>, Vec<StepToken>)> {
                let scored = engine.admit(group)?;
                let steps = engine.step()?;
                Ok((scored, steps))
            },
        ));
        let outcome = match outcome {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the engine panicked".into())),
        };
        match outcome {
            Ok((scored, steps)) => {
                for (id, lps) in scored {
                    if let Some((key, _)) = rows.get(&id) {
                        if let Some(r) = running.get(key) {
                            let _ = r.job.events.send(Event::Prompt(lps));
                        }
                    }
                }
                // echo-only jobs (no new tokens) are done once their prompt is scored
                running.retain(|_, r| {
                    let keep = r.job.request.sampling.max_new_tokens > 0;
                    if !keep {
                        for id in r.rows.iter().flatten() {
                            rows.remove(id);
                        }
                    }
                    keep
                });
                let produced = steps.len();
                for step in steps {
                    let Some(&(key, choice)) = rows.get(&step.id) else { continue };
                    let finished = step.finish.is_some();
                    if let Some(r) = running.get_mut(&key) {
                        let _ = r.job.events.send(Event::Token { choice, step: step.clone() });
                        if finished {
                            r.rows[choice] = None;
                            if r.rows.iter().all(Option::is_none) {
                                running.remove(&key);
                            }
                        }
                    }
                    if finished {
                        rows.remove(&step.id);
                    }
                }
                metrics.record_step(produced, started.elapsed().as_secs_f64());
            }
            Err(message) => {
                tracing::error!("batch failed: {message}");
                for (_, r) in running.drain() {
                    let _ = r.job.events.send(Event::Failed(message.clone()));
                }
                rows.clear();
                engine = Engine::new(lm, pad_id);
                metrics.failed_batches.fetch_add(1, Ordering::Relaxed);
            }
        }
        metrics.running.store(engine.running(), Ordering::Relaxed);
    }
}
