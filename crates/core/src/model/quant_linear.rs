//! The matrix product of a frozen quantised linear, `y = x Wᵀ` with W dequantised on the fly in
//! x's dtype (the model's compute dtype). When x needs a gradient, the product runs as an
//! autograd function written in C++ (csrc/recomputed_linear.cpp) that saves only the quantised
//! state and dequantises W again in backward for `∂L/∂x = ∂L/∂y · W`, as bitsandbytes'
//! `MatMul4Bit` does: plain autograd (`x.linear(dequantised)`) would keep a full-precision copy
//! of every layer's weight alive from forward until backward. The base weight gets no gradient.
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{anyhow, bail, ensure, Result};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::model::ffi::tensor_from_ffi;
use crate::model::quant::{BlockScales, QuantType4, Quantized4, QuantizedInt8, QuantizedWeight};

type RebuildWeight = unsafe extern "C" fn(
    state: *const *mut C_tensor,
    n_state: i64,
    params: *const i64,
    n_params: i64,
    out: *mut *mut C_tensor,
    err: *mut c_char,
    err_len: usize,
) -> i32;

extern "C" {
    fn align_recomputed_linear(
        x: *const C_tensor,
        state: *const *mut C_tensor,
        n_state: i64,
        params: *const i64,
        n_params: i64,
        rebuild: RebuildWeight,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// `x Wᵀ` for a quantised W, in x's dtype.
pub fn quantized_linear(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    let kind = x.kind();
    ensure!(kind_code(kind) >= 0, "quantised linear: input of dtype {kind:?} (expected f32, bf16, f16 or f64)");
    if !x.requires_grad() {
        // no graph is recorded: the dequantised weight lives only for this product
        return Ok(x.f_linear::<Tensor>(&w.dequantize(kind)?, None)?);
    }
    let (state, params) = encode(w, kind);
    let ptrs: Vec<*mut C_tensor> = state.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; 1024];
    // SAFETY: x, the state tensors and params outlive the call; the C++ side copies what it
    // keeps (tensor handles, the ints) and returns a new tensor that we own.
    let rc = unsafe {
        align_recomputed_linear(
            x.as_ptr(),
            ptrs.as_ptr(),
            ptrs.len() as i64,
            params.as_ptr(),
            params.len() as i64,
            rebuild_weight,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    tensor_from_ffi(rc, out, &err, "quantised linear")
}

/// What the C++ function saves: the quantised state's tensors (shallow handles) and the ints
/// that describe it: `[layout, compute kind, quant type, rank, shape…]`, layout 0 = 4-bit,
/// 1 = 4-bit with nested absmax, 2 = int8 rows.
fn encode(w: &QuantizedWeight, kind: Kind) -> (Vec<Tensor>, Vec<i64>) {
    match w {
        QuantizedWeight::FourBit(q) => {
            let qt = match q.quant_type {
                QuantType4::Nf4 => 0,
                QuantType4::Fp4 => 1,
            };
            let (layout, mut state) = match &q.scales {
                BlockScales::Plain(a) => (0, vec![a.shallow_clone()]),
                BlockScales::Nested { codes, absmax, offset } => {
                    (1, vec![codes.shallow_clone(), absmax.shallow_clone(), offset.shallow_clone()])
                }
            };
            state.insert(0, q.packed.shallow_clone());
            let mut params = vec![layout, kind_code(kind), qt, q.shape.len() as i64];
            params.extend(&q.shape);
            (state, params)
        }
        QuantizedWeight::Int8(q) => (vec![q.cb.shallow_clone(), q.scb.shallow_clone()], vec![2, kind_code(kind), 0, 0]),
    }
}

const KINDS: [Kind; 4] = [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double];

fn kind_code(kind: Kind) -> i64 {
    KINDS.iter().position(|k| *k == kind).map_or(-1, |i| i as i64)
}

fn kind_of_code(code: i64) -> Result<Kind> {
    usize::try_from(code).ok().and_then(|i| KINDS.get(i).copied()).ok_or_else(|| anyhow!("compute dtype code {code}"))
}

/// The inverse of [`encode`]: the weight and the compute dtype.
fn decode(state: Vec<Tensor>, params: &[i64]) -> Result<(QuantizedWeight, Kind)> {
    ensure!(params.len() >= 4, "quantised-weight description of {} ints", params.len());
    let kind = kind_of_code(params[1])?;
    let rank = params[3] as usize;
    ensure!(params.len() == 4 + rank, "quantised-weight description of {} ints for rank {rank}", params.len());
    let shape = params[4..].to_vec();
    let quant_type = if params[2] == 0 { QuantType4::Nf4 } else { QuantType4::Fp4 };
    let mut state = state.into_iter();
    let mut next = || state.next().ok_or_else(|| anyhow!("quantised-weight state lacks a tensor"));
    let w = match params[0] {
        0 => {
            let packed = next()?;
            QuantizedWeight::FourBit(Quantized4 { packed, scales: BlockScales::Plain(next()?), quant_type, shape })
        }
        1 => {
            let packed = next()?;
            let (codes, absmax, offset) = (next()?, next()?, next()?);
            QuantizedWeight::FourBit(Quantized4 {
                packed,
                scales: BlockScales::Nested { codes, absmax, offset },
                quant_type,
                shape,
            })
        }
        2 => {
            let cb = next()?;
            QuantizedWeight::Int8(QuantizedInt8 { cb, scb: next()? })
        }
        other => bail!("unknown quantised-weight layout {other}"),
    };
    Ok((w, kind))
}

/// Called by the C++ function in forward and backward: dequantises the saved state.
unsafe extern "C" fn rebuild_weight(
    state: *const *mut C_tensor,
    n_state: i64,
    params: *const i64,
    n_params: i64,
    out: *mut *mut C_tensor,
    err: *mut c_char,
    err_len: usize,
) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Tensor> {
        let tensors: Vec<Tensor> = (0..n_state as usize).map(|i| Tensor::clone_from_ptr(*state.add(i))).collect();
        let params = std::slice::from_raw_parts(params, n_params as usize);
        let (w, kind) = decode(tensors, params)?;
        tch::no_grad(|| w.dequantize(kind))
    }));
    let msg = match result {
        Ok(Ok(mut w)) => {
            *out = w.as_mut_ptr();
            std::mem::forget(w); // the C++ side takes the handle over (and deletes it)
            return 0;
        }
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => "dequantisation panicked".to_string(),
    };
    if err_len > 0 {
        let bytes = msg.as_bytes();
        let n = bytes.len().min(err_len - 1);
        std::ptr::copy_nonoverlapping(bytes.as_ptr() as *const c_char, err, n);
        *err.add(n) = 0;
    }
    1
}
