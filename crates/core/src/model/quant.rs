//! Weight quantisation as bitsandbytes lays it out, bit for bit: 4-bit NF4 / FP4 blocks of 64
//! (`quantize_4bit` / `dequantize_4bit`, optionally with the block absmax quantised again, 8-bit
//! blockwise in blocks of 256: bnb's `compress_statistics`, QLoRA's double quantisation) and
//! LLM.int8's row-wise 8-bit weights (`int8_vectorwise_quant`, as `Int8Params` stores them).
//! Pure functions of tensors; the frozen linears of a quantised model hold these states
//! (`model::decoder::Linear`).
//!
//! The 4-bit layout (bnb 0.50, its CPU path; CUDA's kernel writes the same bytes): the weight is
//! flattened in row-major order and cut into blocks of 64 (the last may be shorter); each block
//! is scaled by the reciprocal of its absmax (f32), clamped to [-1, 1], and every value gets the
//! index of the nearest code value; a value exactly between two code values takes the lower one
//! (`torch.bucketize` over the midpoints, `right=False`). Two indices share a byte, the first
//! element in the high nibble; the packed tensor is `uint8 [(n+1)/2, 1]`. Dequantisation is
//! `code[index] · absmax` in f32, then cast to the compute dtype.
use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::blockwise::{dequantize_blockwise, quantize_blockwise, QuantMap};

/// Elements per 4-bit block (bnb's default `blocksize`, what transformers' `Linear4bit` uses).
pub const BLOCKSIZE_4BIT: i64 = 64;
/// Absmax values per block of the nested 8-bit quantisation (bnb: `quantize_blockwise(…, 256)`).
pub const NESTED_BLOCKSIZE: i64 = 256;

/// bnb's NF4 code (`get_4bit_type("nf4")`): quantiles of N(0, 1) normalised to [-1, 1], sorted.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bnb's FP4 values in bit-pattern order (sign, 2 exponent bits, 1 mantissa bit; exponent bias
/// 2), before `get_4bit_type` divides them by their largest magnitude (12) in f32. Index 8 (sign
/// bit, zero) is -0 as bnb's dequantisation kernels (CPU and CUDA) decode it; `get_4bit_type`
/// holds +0 there (its Python list has the integer `-0`), equal as a number, and bnb's quantiser
/// sorts the two zeros index 0 first either way.
const FP4_UNNORMALISED: [f32; 16] =
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];

/// The indices of the FP4 code in ascending order of value, as bnb's quantiser sorts them
/// (`torch.argsort(code)`; of the two zeros, index 0 before index 8): a scaled value in
/// (-0.0026, 0] gets index 0, one in (0, 0.0026] index 8.
const FP4_ASCENDING: [i64; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// The two 4-bit codes of bitsandbytes (`bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType4 {
    /// NormalFloat4, QLoRA's code for normally distributed weights.
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl QuantType4 {
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType4::Nf4 => "nf4",
            QuantType4::Fp4 => "fp4",
        }
    }

    /// The 16 code values by 4-bit index, as bnb's `get_4bit_type` computes them (f32) and its
    /// kernels decode them (FP4 index 8 is -0, see `FP4_UNNORMALISED`).
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType4::Nf4 => NF4_CODE,
            QuantType4::Fp4 => FP4_UNNORMALISED.map(|v| v / 12.0),
        }
    }

    /// The 4-bit indices in ascending order of their code values.
    fn ascending(self) -> [i64; 16] {
        match self {
            QuantType4::Nf4 => std::array::from_fn(|i| i as i64),
            QuantType4::Fp4 => FP4_ASCENDING,
        }
    }

    /// The 15 decision bounds: midpoints of neighbouring code values in ascending order, in f32.
    fn midpoints(self) -> [f32; 15] {
        let (code, order) = (self.code(), self.ascending());
        std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0)
    }
}

/// The per-block scales of a 4-bit weight: f32, or quantised again (double quantisation).
#[derive(Debug)]
pub enum BlockScales {
    /// `float32 [blocks]`: bnb's `quant_state.absmax` without `compress_statistics`.
    Plain(Tensor),
    /// bnb's nested state: `absmax − offset` quantised 8-bit blockwise in blocks of 256 on the
    /// signed dynamic map: `codes` (`quant_state.absmax`, uint8 [blocks]), `absmax`
    /// (`state2.absmax`, float32 [nested blocks]) and `offset` (the mean absmax,
    /// `quant_state.offset`, a float32 scalar).
    Nested { codes: Tensor, absmax: Tensor, offset: Tensor },
}

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`, the code of every
/// nested absmax) on `device`, built once per device and thread (tensors are not shared
/// between threads; autograd may run a backward pass on a thread of its own).
pub fn nested_map(device: Device) -> Result<Rc<QuantMap>> {
    thread_local! {
        static MAPS: RefCell<Vec<(Device, Rc<QuantMap>)>> = const { RefCell::new(Vec::new()) };
    }
    if let Some(m) = MAPS.with(|maps| maps.borrow().iter().find(|(d, _)| *d == device).map(|(_, m)| m.clone())) {
        return Ok(m);
    }
    let map = Rc::new(QuantMap::dynamic(true, device)?);
    MAPS.with(|maps| maps.borrow_mut().push((device, map.clone())));
    Ok(map)
}

/// A weight quantised to 4 bits as `bitsandbytes.functional.quantize_4bit` returns it.
#[derive(Debug)]
pub struct Quantized4 {
    /// `uint8 [(n+1)/2, 1]`: two indices a byte, the first element in the high nibble.
    pub packed: Tensor,
    pub scales: BlockScales,
    pub quant_type: QuantType4,
    /// The weight's shape (`[out, in]` for a linear).
    pub shape: Vec<i64>,
}

fn f32_tensor(values: &[f32], device: Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values).f_to_device(device)?)
}

/// Quantises `w` (f32, bf16 or f16, any shape) to 4 bits in blocks of 64, as bnb's
/// `quantize_4bit(w, blocksize=64, quant_type, compress_statistics=double_quant)`.
pub fn quantize_4bit(w: &Tensor, quant_type: QuantType4, double_quant: bool) -> Result<Quantized4> {
    ensure!(
        matches!(w.kind(), Kind::Float | Kind::BFloat16 | Kind::Half),
        "4-bit quantisation takes float32, bfloat16 or float16 weights, got {:?}",
        w.kind()
    );
    let device = w.device();
    let flat = w.f_reshape([-1])?.f_to_kind(Kind::Float)?;
    let n = flat.size()[0];
    ensure!(n > 0, "cannot quantise an empty weight");
    let bs = BLOCKSIZE_4BIT;
    let (full, rem) = (n - n % bs, n % bs);
    let mut absmax_parts = Vec::new();
    let mut scaled_parts = Vec::new();
    if full > 0 {
        let blocks = flat.f_narrow(0, 0, full)?.f_view([full / bs, bs])?;
        let absmax = blocks.f_abs()?.f_amax([-1i64].as_slice(), false)?;
        let inv = absmax.f_clamp_min(1e-38)?.f_reciprocal()?.f_view([-1, 1])?;
        scaled_parts.push(blocks.f_mul(&inv)?.f_clamp(-1.0, 1.0)?.f_reshape([-1])?);
        absmax_parts.push(absmax);
    }
    if rem > 0 {
        // bnb divides the last, shorter block by its (clamped) absmax and stores the clamped value
        let tail = flat.f_narrow(0, full, rem)?;
        let am = tail.f_abs()?.f_max()?.f_clamp_min(1e-38)?;
        scaled_parts.push(tail.f_div(&am)?.f_clamp(-1.0, 1.0)?);
        absmax_parts.push(am.f_reshape([1])?);
    }
    let absmax = Tensor::f_cat(&absmax_parts, 0)?;
    let mut scaled = Tensor::f_cat(&scaled_parts, 0)?;
    if n % 2 == 1 {
        scaled = scaled.f_constant_pad_nd([0i64, 1].as_slice())?;
    }
    let bounds = f32_tensor(&quant_type.midpoints(), device)?;
    let mut idx = scaled.f_bucketize(&bounds, false, false)?;
    if quant_type != QuantType4::Nf4 {
        let order = Tensor::from_slice(&quant_type.ascending()).f_to_device(device)?;
        idx = order.f_index_select(0, &idx)?;
    }
    let idx = idx.f_to_kind(Kind::Uint8)?.f_view([-1, 2])?;
    let packed = idx
        .f_select(1, 0)?
        .f_bitwise_left_shift_tensor_scalar(4)?
        .f_bitwise_or_tensor(&idx.f_select(1, 1)?)?
        .f_unsqueeze(1)?;
    let scales = if double_quant {
        // bnb: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256)
        let offset = absmax.f_mean(Kind::Float)?;
        let map = nested_map(device)?;
        let (codes, absmax) = quantize_blockwise(&absmax.f_sub(&offset)?, &map, NESTED_BLOCKSIZE)?;
        BlockScales::Nested { codes, absmax, offset }
    } else {
        BlockScales::Plain(absmax)
    };
    Ok(Quantized4 { packed, scales, quant_type, shape: w.size() })
}

impl Quantized4 {
    /// Number of elements of the weight.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// The f32 absmax of every block (the nested state dequantised and the offset added, as
    /// bnb's `dequantize_4bit` does).
    pub fn block_absmax(&self) -> Result<Tensor> {
        match &self.scales {
            BlockScales::Plain(a) => Ok(a.shallow_clone()),
            BlockScales::Nested { codes, absmax, offset } => {
                let map = nested_map(codes.device())?;
                Ok(dequantize_blockwise(codes, absmax, &map, NESTED_BLOCKSIZE)?.f_add(offset)?)
            }
        }
    }

    /// The weight in `kind`: `code[index] · absmax` per block in f32, then cast, as bnb's
    /// `dequantize_4bit`.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        dequantize_4bit(&self.packed, &self.block_absmax()?, self.quant_type, &self.shape, kind)
    }

    /// Bytes held: the packed nibbles and the scales.
    pub fn nbytes(&self) -> i64 {
        let scales = match &self.scales {
            BlockScales::Plain(a) => tensor_bytes(a),
            BlockScales::Nested { codes, absmax, offset } => {
                tensor_bytes(codes) + tensor_bytes(absmax) + tensor_bytes(offset)
            }
        };
        tensor_bytes(&self.packed) + scales
    }
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

/// bnb's `dequantize_4bit` of packed nibbles with the f32 absmax of each block of 64, to `shape`
/// in `kind`.
pub fn dequantize_4bit(
    packed: &Tensor,
    absmax: &Tensor,
    quant_type: QuantType4,
    shape: &[i64],
    kind: Kind,
) -> Result<Tensor> {
    let n: i64 = shape.iter().product();
    let bs = BLOCKSIZE_4BIT;
    let blocks = (n + bs - 1) / bs;
    let bytes = packed.f_reshape([-1])?;
    ensure!(
        bytes.kind() == Kind::Uint8 && bytes.size()[0] == (n + 1) / 2,
        "packed 4-bit weight: expected uint8 with {} bytes for shape {shape:?}, got {:?} with {}",
        (n + 1) / 2,
        bytes.kind(),
        bytes.size()[0]
    );
    ensure!(
        absmax.size() == [blocks],
        "4-bit absmax: expected [{blocks}] (one per block of {bs}) for shape {shape:?}, got {:?}",
        absmax.size()
    );
    let device = bytes.device();
    let hi = bytes.f_bitwise_right_shift_tensor_scalar(4)?;
    let lo = bytes.f_bitwise_and(15)?;
    let idx = Tensor::f_stack(&[hi, lo], 1)?.f_reshape([-1])?.f_to_kind(Kind::Int64)?;
    let idx = idx.f_constant_pad_nd([0, blocks * bs - idx.size()[0]].as_slice())?;
    let code = f32_tensor(&quant_type.code(), device)?;
    let values = code.f_index_select(0, &idx)?.f_view([blocks, bs])?;
    let scale = absmax.f_to_kind(Kind::Float)?.f_view([blocks, 1])?;
    let w = values.f_mul(&scale)?.f_reshape([-1])?.f_narrow(0, 0, n)?.f_reshape(shape)?;
    Ok(if kind == Kind::Float { w } else { w.f_to_kind(kind)? })
}

/// A weight in LLM.int8's row-wise 8-bit form, as bnb's `Int8Params` stores it: `w ≈ cb ·
/// scb / 127` per row.
#[derive(Debug)]
pub struct QuantizedInt8 {
    /// `int8 [out, in]` (`CB`).
    pub cb: Tensor,
    /// `float32 [out]`: each row's absmax (`SCB`).
    pub scb: Tensor,
}

/// bnb's `int8_vectorwise_quant(w.to(float16))` (what `Int8Params` does to a weight; no outlier
/// threshold): `scb` = absmax of each row, `cb = round(w · 127 / scb)` (half to even). A row of
/// zeros quantises to zeros.
pub fn quantize_int8_rows(w: &Tensor) -> Result<QuantizedInt8> {
    ensure!(w.dim() == 2, "row-wise int8 quantisation takes a [out, in] weight, got shape {:?}", w.size());
    let h = w.f_to_kind(Kind::Half)?;
    let scb = h.f_abs()?.f_amax([1i64].as_slice(), false)?.f_to_kind(Kind::Float)?;
    let factor = scb.f_reciprocal()?.f_mul_scalar(127.0)?;
    // 127 / 0 is inf: the zero row's 0·inf would be NaN
    let factor = factor.f_where_scalarother(&scb.f_gt(0.0)?, 0.0)?.f_unsqueeze(-1)?;
    let cb = h.f_mul(&factor)?.f_round()?.f_to_kind(Kind::Int8)?;
    Ok(QuantizedInt8 { cb, scb })
}

impl QuantizedInt8 {
    /// The weight in `kind`: `cb · scb · (1/127)` in f32 (bnb's `int8_vectorwise_dequant`), cast.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let w =
            self.cb.f_to_kind(Kind::Float)?.f_mul(&self.scb.f_view([-1, 1])?)?.f_mul_scalar(7.874015718698502e-3)?;
        Ok(if kind == Kind::Float { w } else { w.f_to_kind(kind)? })
    }

    pub fn nbytes(&self) -> i64 {
        tensor_bytes(&self.cb) + tensor_bytes(&self.scb)
    }
}

/// How a model's frozen base weights are held (`--quantize`, `[train] quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// bnb 4-bit, blocks of 64 (`load_in_4bit`), with or without double quantisation.
    FourBit { quant_type: QuantType4, double_quant: bool },
    /// LLM.int8-style row-wise int8 weights (inference only).
    Int8,
}

impl Quantization {
    /// From the CLI's `--quantize nf4|fp4|int8` and `--double-quant`.
    pub fn from_flags(method: &str, double_quant: bool) -> Result<Self> {
        match method {
            "nf4" => Ok(Quantization::FourBit { quant_type: QuantType4::Nf4, double_quant }),
            "fp4" => Ok(Quantization::FourBit { quant_type: QuantType4::Fp4, double_quant }),
            "int8" if double_quant => {
                bail!("--double-quant: applies to the 4-bit types nf4 and fp4 (int8 keeps one f32 scale per row)")
            }
            "int8" => Ok(Quantization::Int8),
            other => bail!("--quantize: expected nf4, fp4 or int8, found {other:?}"),
        }
    }

    /// `nf4`, `nf4+double-quant`, `fp4`, `int8`.
    pub fn describe(&self) -> String {
        match self {
            Quantization::FourBit { quant_type, double_quant: true } => format!("{}+double-quant", quant_type.as_str()),
            Quantization::FourBit { quant_type, double_quant: false } => quant_type.as_str().to_string(),
            Quantization::Int8 => "int8".to_string(),
        }
    }
}

/// A frozen weight held quantised.
#[derive(Debug)]
pub enum QuantizedWeight {
    FourBit(Quantized4),
    Int8(QuantizedInt8),
}

impl BlockScales {
    fn shallow_clone(&self) -> Self {
        match self {
            BlockScales::Plain(t) => BlockScales::Plain(t.shallow_clone()),
            BlockScales::Nested { codes, absmax, offset } => BlockScales::Nested {
                codes: codes.shallow_clone(),
                absmax: absmax.shallow_clone(),
                offset: offset.shallow_clone(),
            },
        }
    }
}

impl QuantizedWeight {
    /// The same quantised weight over the same tensors (what a deferred recomputation holds).
    pub(crate) fn shallow_clone(&self) -> Self {
        match self {
            QuantizedWeight::FourBit(q) => QuantizedWeight::FourBit(Quantized4 {
                packed: q.packed.shallow_clone(),
                scales: q.scales.shallow_clone(),
                quant_type: q.quant_type,
                shape: q.shape.clone(),
            }),
            QuantizedWeight::Int8(q) => {
                QuantizedWeight::Int8(QuantizedInt8 { cb: q.cb.shallow_clone(), scb: q.scb.shallow_clone() })
            }
        }
    }

    /// Quantises `w` as `q` says.
    pub fn new(w: &Tensor, q: Quantization) -> Result<Self> {
        Ok(match q {
            Quantization::FourBit { quant_type, double_quant } => {
                QuantizedWeight::FourBit(quantize_4bit(w, quant_type, double_quant)?)
            }
            Quantization::Int8 => QuantizedWeight::Int8(quantize_int8_rows(w)?),
        })
    }

    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        match self {
            QuantizedWeight::FourBit(q) => q.dequantize(kind),
            QuantizedWeight::Int8(q) => q.dequantize(kind),
        }
    }

    /// The weight's shape.
    pub fn shape(&self) -> Vec<i64> {
        match self {
            QuantizedWeight::FourBit(q) => q.shape.clone(),
            QuantizedWeight::Int8(q) => q.cb.size(),
        }
    }

    /// Bytes of the quantised state.
    pub fn nbytes(&self) -> i64 {
        match self {
            QuantizedWeight::FourBit(q) => q.nbytes(),
            QuantizedWeight::Int8(q) => q.nbytes(),
        }
    }
}
