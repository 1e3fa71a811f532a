//! Where a training step's time goes — backward, optimizer, generation, the rest (forward, loss,
//! data) — for `align bench train`. Off by default: a normal run neither times nor synchronises.
//! Switched on ([`enable`]), each timed phase waits for the device before and after it (CUDA
//! kernels run asynchronously: without the wait a phase would be charged to the next one), and
//! the loop adds the step's split to its metrics line (`time/…`, seconds).
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// A timed part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `recompute::backward`: the backward pass, checkpointed layers' recomputation included.
    Backward,
    /// The optimizer's update (AdamW, the all-gathers of sharded parameters included).
    Optimizer,
    /// Generation through the KV-cache engine (PPO / GRPO rollouts, on-policy distillation).
    Generation,
}

/// Seconds per phase of the current step, and the tokens generated in it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepPhases {
    pub backward: f64,
    pub optimizer: f64,
    pub generation: f64,
    pub generated_tokens: usize,
}

thread_local! {
    static CURRENT: RefCell<StepPhases> = RefCell::new(StepPhases::default());
}

/// Switches phase timing on or off for the process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Waits for every CUDA device's queued work (nothing on CPU).
pub fn synchronize() {
    if tch::Cuda::is_available() {
        for i in 0..tch::Cuda::device_count() {
            tch::Cuda::synchronize(i);
        }
    }
}

/// Runs `f`, charging its time (device work included) to `phase` when timing is on.
pub fn timed<T>(phase: Phase, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    synchronize();
    let started = Instant::now();
    let out = f();
    synchronize();
    let secs = started.elapsed().as_secs_f64();
    CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        match phase {
            Phase::Backward => c.backward += secs,
            Phase::Optimizer => c.optimizer += secs,
            Phase::Generation => c.generation += secs,
        }
    });
    out
}

/// Counts `n` generated tokens into the current step (when timing is on).
pub fn add_generated_tokens(n: usize) {
    if enabled() {
        CURRENT.with(|c| c.borrow_mut().generated_tokens += n);
    }
}

/// The current step's phases, reset for the next step.
pub fn take() -> StepPhases {
    CURRENT.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_charged_only_while_enabled_and_taken_once() {
        // one test owns the process-wide switch
        let _ = take();
        timed(Phase::Backward, || Ok(std::thread::sleep(std::time::Duration::from_millis(5)))).unwrap();
        add_generated_tokens(3);
        assert_eq!(take(), StepPhases::default(), "nothing is recorded while timing is off");
        enable(true);
        timed(Phase::Backward, || Ok(std::thread::sleep(std::time::Duration::from_millis(5)))).unwrap();
        timed(Phase::Generation, || Ok(())).unwrap();
        add_generated_tokens(3);
        let e = timed(Phase::Optimizer, || -> Result<()> { anyhow::bail!("failed") }).unwrap_err();
        enable(false);
        assert_eq!(e.to_string(), "failed", "the phase's result is passed on");
        let p = take();
        assert!(p.backward >= 0.005 && p.generation >= 0.0 && p.optimizer >= 0.0, "{p:?}");
        assert_eq!(p.generated_tokens, 3);
        assert_eq!(take(), StepPhases::default(), "taken once");
    }
}
