//! Data-parallel collectives on PyTorch's own distributed engine: a c10d process group
//! (`ProcessGroupGloo` over a `TCPStore`, both compiled into the libtorch tch links) reached
//! through a small C++ shim (`csrc/c10d.cpp`), created from torchrun's environment.
//!
//! One process per rank. [`init_from_env`] reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR` and `MASTER_PORT` (as torchrun, `srun` wrappers and the tests set them); a world
//! of one (or no such variables) makes no shim call at all. [`world`] is the process's world
//! afterwards; every collective is a `Result` whose error names this rank and the operation.
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn align_dist_new(
        host: *const c_char,
        port: i32,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        agent_store: i32,
        prefix: *const c_char,
        device_host: *const c_char,
        device_iface: *const c_char,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn align_dist_free(group: *mut c_void);
    fn align_dist_all_reduce(group: *mut c_void, t: *mut C_tensor, op: i32, err: *mut c_char, len: usize) -> i32;
    fn align_dist_reduce(group: *mut c_void, t: *mut C_tensor, root: i32, op: i32, err: *mut c_char, len: usize)
        -> i32;
    fn align_dist_broadcast(group: *mut c_void, t: *mut C_tensor, root: i32, err: *mut c_char, len: usize) -> i32;
    fn align_dist_all_gather(
        group: *mut c_void,
        output: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn align_dist_reduce_scatter(
        group: *mut c_void,
        output: *mut C_tensor,
        input: *mut C_tensor,
        op: i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn align_dist_barrier(group: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn align_dist_set_grad(param: *mut C_tensor, grad: *mut C_tensor, err: *mut c_char, len: usize) -> i32;
    fn align_dist_release_grad(param: *mut C_tensor, err: *mut c_char, len: usize) -> i32;
}

/// Runs a shim function with an error buffer: its message when it fails.
fn shim(f: impl FnOnce(*mut c_char, usize) -> i32) -> std::result::Result<(), String> {
    let mut err = [0 as c_char; 2048];
    if f(err.as_mut_ptr(), err.len()) != 0 {
        // SAFETY: the shim always NUL-terminates the buffer
        return Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned());
    }
    Ok(())
}

fn local_call(what: &str, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    shim(f).map_err(|msg| anyhow!("{what}: {msg}"))
}

/// Sets the gradient of the leaf `param` to `grad` (tch has no setter).
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    // SAFETY: both handles are live tensors; the shim copies the handle of `grad`
    local_call("setting a gradient", |err, len| unsafe { align_dist_set_grad(raw(&param), raw(&grad), err, len) })
}

/// Drops the gradient of `param`, freeing its memory.
pub fn release_grad(param: &Tensor) -> Result<()> {
    // SAFETY: a live tensor handle
    local_call("releasing a gradient", |err, len| unsafe { align_dist_release_grad(raw(&param), err, len) })
}

/// How values of the ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    fn code(self) -> i32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        }
    }
}

/// The communication backend of a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors natively; CUDA tensors go through host memory.
    Gloo,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
        }
    }

    /// `ALIGN_DIST_BACKEND` (default gloo). NCCL is named and refused: this build's shim links
    /// Gloo only.
    pub fn parse(value: &str) -> Result<Backend> {
        match value {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => bail!(
                "ALIGN_DIST_BACKEND = \"nccl\": this build of align links c10d's Gloo backend only (ProcessGroupNCCL \
                 needs the CUDA headers at build time); use \"gloo\" (CUDA tensors are reduced through host memory)"
            ),
            other => bail!("ALIGN_DIST_BACKEND = {other:?}: expected \"gloo\" (or \"nccl\")"),
        }
    }
}

/// Where and how to join a process group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub backend: Backend,
    /// How long a collective (and the rendezvous) may wait for the other ranks.
    pub timeout: Duration,
    /// The TCPStore is served by torchrun's agent (`TORCHELASTIC_USE_AGENT_STORE=True`) instead
    /// of rank 0.
    pub agent_store: bool,
}

/// A joined c10d process group.
pub struct ProcessGroup {
    ptr: *mut c_void,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// SAFETY: c10d backends are thread-safe objects; the handle is only a pointer to them.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: ptr came from align_dist_new and is freed once
        unsafe { align_dist_free(self.ptr) }
    }
}

fn call(
    what: &str,
    rank: usize,
    size: usize,
    timeout: Duration,
    f: impl FnOnce(*mut c_char, usize) -> i32,
) -> Result<()> {
    shim(f).map_err(|msg| {
        anyhow!(
            "rank {rank} of {size}: {what} failed: {} (another rank exited or stopped answering within {}s; see its log)",
            msg.lines().next().unwrap_or(""),
            timeout.as_secs()
        )
    })
}

/// The `at::Tensor*` of a tensor, for the shim (which works on the tensor's storage in place).
fn raw(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// A tensor Gloo can work on in place: contiguous, on the CPU. Returns it and whether it is a
/// copy that must be written back.
fn host(t: &Tensor) -> Result<(Tensor, bool)> {
    if t.device() == Device::Cpu && t.is_contiguous() {
        Ok((t.shallow_clone(), false))
    } else {
        Ok((t.f_to_device(Device::Cpu)?.f_contiguous()?, true))
    }
}

impl ProcessGroup {
    /// Joins the group (blocks until every rank has joined, or the timeout).
    pub fn new(cfg: &GroupConfig) -> Result<ProcessGroup> {
        if cfg.world_size < 2 {
            bail!("a process group needs at least 2 ranks (world size {})", cfg.world_size);
        }
        if cfg.rank >= cfg.world_size {
            bail!("RANK {} is not below WORLD_SIZE {}", cfg.rank, cfg.world_size);
        }
        let host = CString::new(cfg.master_addr.clone()).context("MASTER_ADDR")?;
        // keys of an earlier attempt under torchrun's restarts (--max-restarts) stay apart
        let attempt = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|_| "0".into());
        let prefix = CString::new(format!("align/attempt_{attempt}")).context("TORCHELASTIC_RESTART_COUNT")?;
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        // a loopback master means every rank is on this machine: bind Gloo there too
        let loopback = cfg.master_addr == "localhost" || cfg.master_addr.starts_with("127.");
        let device_host = CString::new(if iface.is_empty() && loopback { "127.0.0.1" } else { "" }).expect("no NUL");
        let device_iface = CString::new(iface).context("GLOO_SOCKET_IFNAME")?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let what = format!(
            "joining the {} process group at {}:{} (world size {})",
            cfg.backend.as_str(),
            cfg.master_addr,
            cfg.master_port,
            cfg.world_size
        );
        call(&what, cfg.rank, cfg.world_size, cfg.timeout, |err, len| unsafe {
            // SAFETY: every string lives through the call; ptr receives a new handle
            align_dist_new(
                host.as_ptr(),
                cfg.master_port as i32,
                cfg.rank as i32,
                cfg.world_size as i32,
                cfg.timeout.as_millis() as i64,
                cfg.agent_store as i32,
                prefix.as_ptr(),
                device_host.as_ptr(),
                device_iface.as_ptr(),
                &mut ptr,
                err,
                len,
            )
        })?;
        Ok(ProcessGroup { ptr, rank: cfg.rank, size: cfg.world_size, timeout: cfg.timeout })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn run(&self, what: &str, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
        call(what, self.rank, self.size, self.timeout, f)
    }

    /// Combines `t` of every rank into `t` of every rank.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let (h, copied) = host(t)?;
        self.run("all_reduce", |err, len| unsafe { align_dist_all_reduce(self.ptr, raw(&h), op.code(), err, len) })?;
        if copied {
            t.f_copy_(&h)?;
        }
        Ok(())
    }

    /// The mean of `t` over the ranks (a sum, then divided by the world size: Gloo has no mean).
    pub fn all_reduce_mean(&self, t: &mut Tensor) -> Result<()> {
        self.all_reduce(t, ReduceOp::Sum)?;
        let _ = t.f_div_scalar_(self.size as f64)?;
        Ok(())
    }

    /// Combines `t` of every rank into `t` of rank `root` (the others' `t` is left undefined in
    /// value).
    pub fn reduce(&self, t: &mut Tensor, root: usize, op: ReduceOp) -> Result<()> {
        let (h, copied) = host(t)?;
        self.run("reduce", |err, len| unsafe {
            align_dist_reduce(self.ptr, raw(&h), root as i32, op.code(), err, len)
        })?;
        if copied && self.rank == root {
            t.f_copy_(&h)?;
        }
        Ok(())
    }

    /// `t` of rank `root` into `t` of every rank.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let (h, copied) = host(t)?;
        self.run("broadcast", |err, len| unsafe { align_dist_broadcast(self.ptr, raw(&h), root as i32, err, len) })?;
        if copied {
            t.f_copy_(&h)?;
        }
        Ok(())
    }

    /// The inputs of all ranks (same shape on each), stacked along a new first dimension in
    /// rank order.
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        // Gloo gathers flat: the output is the inputs back to back, viewed as [world, shape…]
        let (h, _) = host(&input.f_reshape([-1])?)?;
        let n = h.numel() as i64;
        let out = Tensor::f_empty([self.size as i64 * n], (input.kind(), Device::Cpu))?;
        self.run("all_gather", |err, len| unsafe { align_dist_all_gather(self.ptr, raw(&out), raw(&h), err, len) })?;
        let mut shape = vec![self.size as i64];
        shape.extend(input.size());
        Ok(out.f_view(shape.as_slice())?.f_to_device(input.device())?)
    }

    /// `input` holds one block per rank along its first dimension (size `world · k`); rank r
    /// gets the reduction of block r over all ranks.
    pub fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let shape = input.size();
        let first = *shape.first().ok_or_else(|| anyhow!("reduce_scatter of a 0-dimensional tensor"))?;
        if first % self.size as i64 != 0 {
            bail!("reduce_scatter: first dimension {first} is not a multiple of the world size {}", self.size);
        }
        let (h, _) = host(input)?;
        let mut out_shape = shape.clone();
        out_shape[0] = first / self.size as i64;
        let out = Tensor::f_empty(out_shape.as_slice(), (input.kind(), Device::Cpu))?;
        self.run("reduce_scatter", |err, len| unsafe {
            align_dist_reduce_scatter(self.ptr, raw(&out), raw(&h), op.code(), err, len)
        })?;
        Ok(out.f_to_device(input.device())?)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.run("barrier", |err, len| unsafe { align_dist_barrier(self.ptr, err, len) })
    }

    /// Combines a few numbers (metrics, counters) over the ranks, in f64.
    pub fn all_reduce_f64(&self, xs: &mut [f64], op: ReduceOp) -> Result<()> {
        if xs.is_empty() {
            return Ok(());
        }
        let mut t = Tensor::from_slice(xs);
        self.all_reduce(&mut t, op)?;
        t.f_copy_data(xs, xs.len())?;
        Ok(())
    }
}

/// This process's place in the job.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    group: Option<ProcessGroup>,
}

impl World {
    /// A world of one process (no group).
    pub fn single() -> World {
        World { rank: 0, size: 1, local_rank: 0, group: None }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0: the one that writes files.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The process group of a world of two or more.
    pub fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    /// A barrier of every rank (nothing in a world of one).
    pub fn barrier(&self) -> Result<()> {
        self.group.as_ref().map_or(Ok(()), |g| g.barrier())
    }

    /// Sums a few numbers over the ranks (nothing in a world of one).
    pub fn sum_f64(&self, xs: &mut [f64]) -> Result<()> {
        self.group.as_ref().map_or(Ok(()), |g| g.all_reduce_f64(xs, ReduceOp::Sum))
    }

    /// The values of every rank (the same count on each), concatenated in rank order (the
    /// values themselves in a world of one).
    pub fn gather_f64(&self, xs: &[f64]) -> Result<Vec<f64>> {
        let Some(g) = &self.group else { return Ok(xs.to_vec()) };
        self.agree("the number of values gathered", xs.len() as u64)?;
        let all = g.all_gather(&Tensor::from_slice(xs))?;
        Ok(Vec::<f64>::try_from(all.f_reshape([-1])?)?)
    }

    /// Fails unless every rank holds the same `value` (e.g. the checkpoint each resumes from).
    pub fn agree(&self, what: &str, value: u64) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        // the largest value and the largest negated value (the smallest) in one reduction
        let mut range = [value as f64, -(value as f64)];
        g.all_reduce_f64(&mut range, ReduceOp::Max)?;
        let (hi, lo) = (range[0], -range[1]);
        if hi != lo {
            bail!(
                "rank {} of {}: the ranks disagree on {what} (from {lo} to {hi}; this rank has {value})",
                self.rank,
                self.size
            );
        }
        Ok(())
    }
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map(Some).map_err(|_| anyhow!("{name}={v:?} is not a non-negative integer")),
        Err(_) => Ok(None),
    }
}

/// The group settings of this process from its environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `MASTER_ADDR`, `MASTER_PORT`; `ALIGN_DIST_BACKEND`, `ALIGN_DIST_TIMEOUT` in seconds, default
/// 1800 as torch's), or None for a world of one.
pub fn config_from_env() -> Result<Option<(GroupConfig, usize)>> {
    let Some(world_size) = env_usize("WORLD_SIZE")? else { return Ok(None) };
    if world_size <= 1 {
        return Ok(None);
    }
    let rank = env_usize("RANK")?.ok_or_else(|| anyhow!("WORLD_SIZE={world_size} is set but RANK is not"))?;
    let local_rank = env_usize("LOCAL_RANK")?.unwrap_or(rank);
    let master_addr =
        std::env::var("MASTER_ADDR").map_err(|_| anyhow!("WORLD_SIZE={world_size} is set but MASTER_ADDR is not"))?;
    let port =
        env_usize("MASTER_PORT")?.ok_or_else(|| anyhow!("WORLD_SIZE={world_size} is set but MASTER_PORT is not"))?;
    let master_port = u16::try_from(port).map_err(|_| anyhow!("MASTER_PORT={port} is not a port number"))?;
    let backend = Backend::parse(&std::env::var("ALIGN_DIST_BACKEND").unwrap_or_else(|_| "gloo".into()))?;
    let timeout = match std::env::var("ALIGN_DIST_TIMEOUT") {
        Ok(v) => {
            let s: f64 =
                v.trim().parse().map_err(|_| anyhow!("ALIGN_DIST_TIMEOUT={v:?} is not a number of seconds"))?;
            if !(s > 0.0) {
                bail!("ALIGN_DIST_TIMEOUT={v:?} must be positive");
            }
            Duration::from_secs_f64(s)
        }
        Err(_) => Duration::from_secs(1800),
    };
    let agent_store = std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v == "True");
    Ok(Some((GroupConfig { rank, world_size, master_addr, master_port, backend, timeout, agent_store }, local_rank)))
}

static WORLD: OnceLock<World> = OnceLock::new();

/// Joins the process group described by the environment (once per process); a world of one
/// when no group is described.
pub fn init_from_env() -> Result<&'static World> {
    if let Some(w) = WORLD.get() {
        return Ok(w);
    }
    let world = match config_from_env()? {
        None => World::single(),
        Some((cfg, local_rank)) => {
            let group = ProcessGroup::new(&cfg)?;
            tracing::info!(
                "rank {} of {} (local rank {local_rank}) joined the {} group at {}:{}",
                cfg.rank,
                cfg.world_size,
                cfg.backend.as_str(),
                cfg.master_addr,
                cfg.master_port
            );
            World { rank: cfg.rank, size: cfg.world_size, local_rank, group: Some(group) }
        }
    };
    Ok(WORLD.get_or_init(|| world))
}

/// The world of this process: what [`init_from_env`] joined, or a world of one.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Flattened buckets of about `bucket_bytes` over `tensors` (same dtype and device within a
/// bucket, in order): the unit of one collective call, as DDP's reducer buckets gradients.
pub fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0usize;
    let mut key: Option<(Kind, Device)> = None;
    for (i, t) in tensors.iter().enumerate() {
        let k = (t.kind(), t.device());
        let size = t.numel() * t.kind().elt_size_in_bytes();
        if out.is_empty() || key != Some(k) || bytes + size > bucket_bytes && bytes > 0 {
            out.push(Vec::new());
            bytes = 0;
            key = Some(k);
        }
        out.last_mut().expect("pushed").push(i);
        bytes += size;
    }
    out
}

/// Runs `op` on each bucket of `tensors` flattened into one buffer, then copies the buffer back
/// into the tensors (in place).
pub fn bucketed(
    tensors: &[Tensor],
    bucket_bytes: usize,
    mut op: impl FnMut(&mut Tensor, &[usize]) -> Result<()>,
) -> Result<()> {
    for bucket in buckets(tensors, bucket_bytes) {
        let parts: Vec<Tensor> = bucket.iter().map(|&i| tensors[i].reshape([-1])).collect();
        let mut flat = Tensor::f_cat(&parts, 0)?;
        op(&mut flat, &bucket)?;
        let mut at = 0i64;
        for &i in &bucket {
            let n = tensors[i].numel() as i64;
            let mut dst = tensors[i].shallow_clone();
            tch::no_grad(|| dst.f_copy_(&flat.f_narrow(0, at, n)?.f_view(tensors[i].size().as_slice())?))?;
            at += n;
        }
    }
    Ok(())
}

/// The default bucket size of gradient reductions (DDP's 25 MB).
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;
