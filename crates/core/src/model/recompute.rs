//! Deferred backward passes: the parts of a training forward pass that keep no autograd graph —
//! decoder layers under activation checkpointing, LM heads run over chunks of positions — leave
//! here how to compute their gradients once the gradients of their outputs are known.
//! [`backward`] runs a loss's backward pass and then these, newest first, each recomputing its
//! part from the inputs it kept and back-propagating the gradients its outputs received, so the
//! parameters end up with the gradients an ordinary backward pass gives them.
//!
//! Random numbers (LoRA dropout): a part that draws them runs from a seed taken from the stream
//! ([`fork_rng`]), and its recomputation runs from the same seed, so it draws the same masks.
//! Forward passes fork the stream whether or not they defer anything, and [`backward`] returns
//! the stream to one point either way, so a run draws the same numbers with checkpointing on or
//! off.
use std::cell::RefCell;

use anyhow::{anyhow, Result};
use tch::{Kind, Tensor};

type Run = Box<dyn FnOnce(Vec<Tensor>) -> Result<()>>;

/// One deferred part: its outputs (leaves of the graph that follows it) and how to
/// back-propagate their gradients through it.
struct Deferred {
    outputs: Vec<Tensor>,
    run: Run,
}

#[derive(Default)]
struct Tape {
    pending: Vec<Deferred>,
    /// A forward pass forked the random stream since the last backward pass.
    forked: bool,
}

thread_local! {
    static TAPE: RefCell<Tape> = RefCell::new(Tape::default());
}

/// True when operations record an autograd graph (not inside `tch::no_grad`).
pub fn grad_enabled() -> bool {
    // at_grad_set_enabled returns the previous mode; set it back at once
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(1);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// Registers a deferred part. `outputs` are tensors that require grad and hold no graph (the
/// rest of the forward pass starts from them); after the loss's backward pass `run` receives
/// their gradients (zeros for an output the loss did not use) and must back-propagate them
/// through the part, e.g. with [`backprop`]. A part none of whose outputs got a gradient is
/// dropped without running.
pub fn defer(outputs: Vec<Tensor>, run: impl FnOnce(Vec<Tensor>) -> Result<()> + 'static) {
    TAPE.with(|t| t.borrow_mut().pending.push(Deferred { outputs, run: Box::new(run) }));
}

/// Number of deferred parts waiting for a backward pass.
pub fn pending() -> usize {
    TAPE.with(|t| t.borrow().pending.len())
}

/// Drops the deferred parts of forward passes that will not be back-propagated (and what they
/// kept alive).
pub fn discard() {
    TAPE.with(|t| {
        let mut t = t.borrow_mut();
        t.pending.clear();
        t.forked = false;
    });
}

/// Seeds the random generators from one draw of their current stream and returns the seed, so
/// that what follows can be replayed with `tch::manual_seed(seed)`.
pub fn fork_rng() -> Result<i64> {
    let seed = Tensor::f_randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu))?.f_int64_value(&[0])?;
    tch::manual_seed(seed);
    TAPE.with(|t| t.borrow_mut().forked = true);
    Ok(seed)
}

/// Back-propagates `grads` through `outputs` (computed with a graph): `Σ (outputᵢ · gradᵢ)`,
/// whose gradient with respect to each output is exactly its `grad`. Outputs that need no
/// gradient are skipped. The graph is kept (it is freed with its tensors): the inputs of several
/// parts may share one graph, as prefix tuning's keys and values of every layer come from one
/// table.
pub fn backprop(outputs: &[Tensor], grads: &[Tensor]) -> Result<()> {
    let mut total: Option<Tensor> = None;
    for (o, g) in outputs.iter().zip(grads) {
        if !o.requires_grad() {
            continue;
        }
        let g = if g.kind() == o.kind() { g.shallow_clone() } else { g.f_to_kind(o.kind())? };
        let term = o.f_mul(&g)?.f_sum(Kind::Float)?;
        total = Some(match total {
            Some(t) => t.f_add(&term)?,
            None => term,
        });
    }
    if let Some(t) = total {
        backward_keeping_graph(&t)?;
    }
    Ok(())
}

/// Runs `loss`'s backward pass, then every deferred part newest first, so that parameters get
/// their whole gradients. Use this instead of `loss.backward()` in training steps.
pub fn backward(loss: &Tensor) -> Result<()> {
    crate::train::phases::timed(crate::train::phases::Phase::Backward, || backward_untimed(loss))
}

fn backward_untimed(loss: &Tensor) -> Result<()> {
    let (pending, forked) = TAPE.with(|t| {
        let mut t = t.borrow_mut();
        (std::mem::take(&mut t.pending), std::mem::replace(&mut t.forked, false))
    });
    if pending.is_empty() {
        loss.f_backward()?;
    } else {
        // the graph is kept: a deferred part may hand gradients into a graph the loss shares
        backward_keeping_graph(loss)?;
    }
    // recomputations replay their own seeds; afterwards the stream continues from one fork
    // taken here, with or without checkpointing
    let resume = if forked { Some(fork_rng()?) } else { None };
    let result = run_pending(pending);
    if let Some(seed) = resume {
        tch::manual_seed(seed);
    }
    TAPE.with(|t| t.borrow_mut().forked = false);
    result
}

fn run_pending(pending: Vec<Deferred>) -> Result<()> {
    for part in pending.into_iter().rev() {
        let grads: Vec<Tensor> = part.outputs.iter().map(|o| o.grad()).collect();
        if grads.iter().all(|g| !g.defined()) {
            continue;
        }
        let grads = grads
            .into_iter()
            .zip(&part.outputs)
            .map(|(g, o)| if g.defined() { Ok(g) } else { Ok(Tensor::f_zeros_like(o)?) })
            .collect::<Result<Vec<_>>>()?;
        drop(part.outputs);
        (part.run)(grads)?;
    }
    Ok(())
}

fn backward_keeping_graph(loss: &Tensor) -> Result<()> {
    unsafe {
        torch_sys::at_backward(loss.as_ptr() as *mut _, 1, 0);
        let err = torch_sys::get_and_reset_last_err();
        if !err.is_null() {
            let msg = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            libc_free(err as *mut std::ffi::c_void);
            return Err(anyhow!("backward pass: {msg}"));
        }
    }
    Ok(())
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut std::ffi::c_void);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// `y = tanh(x · w)` computed without a graph and deferred gives `w` the gradient of the
    /// ordinary graph, bitwise.
    #[test]
    fn a_deferred_part_gives_the_ordinary_gradient() {
        tch::manual_seed(3);
        let mut w = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let plain = x.matmul(&w).tanh().square().sum(Kind::Float);
        plain.backward();
        let want = w.grad().copy();
        w.zero_grad();

        let y = tch::no_grad(|| x.matmul(&w).tanh()).set_requires_grad(true);
        let (wc, xc) = (w.shallow_clone(), x.shallow_clone());
        defer(vec![y.shallow_clone()], move |g| backprop(&[xc.matmul(&wc).tanh()], &g));
        assert_eq!(pending(), 1);
        backward(&y.square().sum(Kind::Float)).unwrap();
        assert_eq!(pending(), 0);
        assert!(w.grad().equal(&want));
    }

    /// Parts whose outputs the loss never used do not run; `discard` drops parts.
    #[test]
    fn unused_parts_are_skipped_and_discard_drops_them() {
        let ran = std::rc::Rc::new(std::cell::Cell::new(false));
        let r = ran.clone();
        let unused = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        defer(vec![unused], move |_| {
            r.set(true);
            Ok(())
        });
        let other = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        backward(&other.sum(Kind::Float)).unwrap();
        assert!(!ran.get());
        defer(vec![other.shallow_clone()], |_| Ok(()));
        discard();
        assert_eq!(pending(), 0);
        assert!(grad_enabled());
        assert!(!tch::no_grad(grad_enabled));
    }
}
