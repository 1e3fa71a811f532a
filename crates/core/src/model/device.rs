//! Device and dtype selection from user flags (`auto|cpu|cuda[:N]`, `f32|bf16|f16`).
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// Parses a device flag; `auto` picks CUDA when available. In a data-parallel job `auto` and
/// `cuda` mean this rank's GPU, `cuda:LOCAL_RANK` (torchrun's convention).
pub fn parse_device(s: &str) -> Result<Device> {
    let local = align_dist::world().local_rank();
    Ok(match s {
        "auto" => {
            if tch::Cuda::is_available() {
                cuda(local)?
            } else {
                Device::Cpu
            }
        }
        "cpu" => Device::Cpu,
        "cuda" | "gpu" => cuda(local)?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i)?,
            _ => bail!("device '{other}': expected auto, cpu, cuda or cuda:N"),
        },
    })
}

fn cuda(i: usize) -> Result<Device> {
    let n = tch::Cuda::device_count() as usize;
    if n == 0 {
        bail!("device 'cuda': no CUDA device is available (libtorch sees none)");
    }
    if i >= n {
        bail!("device 'cuda:{i}': only {n} CUDA device(s) available");
    }
    Ok(Device::Cuda(i))
}

/// Parses a dtype flag. `None` (no flag): f32 on CPU, bf16 on CUDA.
pub fn parse_dtype(s: Option<&str>, device: Device) -> Result<Kind> {
    Ok(match s {
        None | Some("auto") => {
            if device.is_cuda() {
                Kind::BFloat16
            } else {
                Kind::Float
            }
        }
        Some("f32") | Some("float32") | Some("fp32") => Kind::Float,
        Some("bf16") | Some("bfloat16") => Kind::BFloat16,
        Some("f16") | Some("float16") | Some("fp16") => Kind::Half,
        Some(other) => bail!("dtype '{other}': expected f32, bf16 or f16"),
    })
}

/// Caps oneDNN (libtorch's CPU kernels) below AMX unless `ONEDNN_MAX_CPU_ISA` is already set.
/// On some virtual machines that advertise AMX, oneDNN's bf16 AMX kernels die with SIGILL
/// (`tilezero`) even after the kernel grants the tile permission; AVX-512 bf16 kernels work
/// everywhere. Set `ONEDNN_MAX_CPU_ISA=ALL` to use AMX on hardware where it works. Must run
/// before the first CPU matmul; runs once.
pub fn enable_cpu_features() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("ONEDNN_MAX_CPU_ISA").is_none() {
            // SAFETY: called at start-up before this library spawns threads; libtorch reads the
            // variable lazily at its first CPU primitive.
            unsafe { std::env::set_var("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16") };
        }
    });
}
