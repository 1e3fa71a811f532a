//! 8-bit block-wise quantisation as bitsandbytes does it: the dynamic maps
//! (`create_dynamic_map`), `quantize_blockwise` (absmax per block, nearest map entry as
//! bitsandbytes' CPU code picks it) and `dequantize_blockwise`; pure functions over tensors.
//!
//! bitsandbytes' CPU quantiser does not search the map: it scales a value by `1 / absmax`
//! (float32), clamps it to [-1, 1], rounds it onto a grid of 65536 points of [-1, 1]
//! (`(s + 1) · 0.5 · 65535 + 0.5`, truncated) and reads the map index of that grid point from a
//! table built once per map: the number of midpoints between neighbouring entries that lie
//! strictly below the grid point. So "nearest" is the nearest entry of the grid point, not of
//! the value itself — a few values in a thousand near a midpoint get the other neighbour — and a
//! block whose absmax is 0 gets code 0 everywhere. [`quantize_blockwise`] computes exactly that
//! with tensor operations (on any device), so the codes are bitsandbytes' bytes, ties included.
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

/// Entries of an 8-bit map.
pub const MAP_SIZE: usize = 256;
/// Points of bitsandbytes' CPU lookup grid of [-1, 1].
const GRID_SIZE: usize = 65536;
/// Elements quantised per pass (a whole number of blocks), bounding the temporaries.
const CHUNK_ELEMENTS: i64 = 1 << 22;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
/// float32 values in [-1, 1] (signed) or [0, 1] (unsigned), on the CPU. Built with the same
/// float32 tensor operations as bitsandbytes, so the values are its values bit for bit.
/// `torch.linspace(start, end, n)` in float32 as its vectorised CPU kernels compute it, which
/// bitsandbytes' maps come from: `start + step·i` for the first half and `end − step·(n−1−i)`
/// for the rest, each a fused multiply-add with `step = (end − start) / (n − 1)`. Computed here
/// rather than by `Tensor::linspace`, whose portable (non-vectorised) kernel rounds the product
/// and the sum separately and so differs from bitsandbytes' values in the last bit.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

pub fn dynamic_map(signed: bool) -> Result<Tensor> {
    const MAX_EXPONENT_BITS: i64 = 7;
    const NON_SIGN_BITS: i64 = 7;
    let mut parts = Vec::new();
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = if signed {
            (1i64 << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1
        } else {
            (1i64 << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS + 1)) + 1
        };
        let boundaries = Tensor::f_from_slice(&linspace_f32(0.1, 1.0, fraction_items as usize))?;
        let means = boundaries
            .f_narrow(0, 0, fraction_items - 1)?
            .f_add(&boundaries.f_narrow(0, 1, fraction_items - 1)?)?
            .f_div_scalar(2.0)?;
        // Python's `10 ** (-(max_exponent_bits - 1) + i)`: exact for i = 6, else a float literal
        let scale: f64 = format!("1e{}", -(MAX_EXPONENT_BITS - 1) + i).parse()?;
        parts.push(means.f_mul_scalar(scale)?);
        if signed {
            parts.push(means.f_mul_scalar(-scale)?);
        }
    }
    // with 8 bits and 7 exponent bits there are no "additional items" (2^0 - 1 = 0)
    parts.push(Tensor::f_from_slice(&[0f32, 1.0])?);
    let data = Tensor::f_cat(&parts, 0)?;
    ensure!(data.numel() == MAP_SIZE, "dynamic map has {} entries, expected {MAP_SIZE}", data.numel());
    Ok(data.f_sort(0, false)?.0)
}

/// An 8-bit map (256 sorted float32 entries) and bitsandbytes' lookup table for it, on one
/// device. Build once, use for every quantisation with that map.
#[derive(Debug)]
pub struct QuantMap {
    /// float32 [256], sorted ascending.
    pub code: Tensor,
    /// map index of each grid point, uint8 [65536].
    lut: Tensor,
}

impl QuantMap {
    /// The map `code` (float32 [256], sorted ascending, as bitsandbytes requires).
    pub fn new(code: &Tensor, device: Device) -> Result<QuantMap> {
        ensure!(
            code.size() == [MAP_SIZE as i64],
            "an 8-bit map has {MAP_SIZE} entries, this one has shape {:?}",
            code.size()
        );
        let values: Vec<f32> = Vec::try_from(code.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)?;
        if let Some(i) = values.windows(2).position(|w| !(w[0] <= w[1])) {
            bail!(
                "an 8-bit map must be sorted ascending: entry {i} is {} and entry {} is {}",
                values[i],
                i + 1,
                values[i + 1]
            );
        }
        let lut = lookup_table(&values);
        Ok(QuantMap {
            code: Tensor::f_from_slice(&values)?.f_to_device(device)?,
            lut: Tensor::f_from_slice(&lut)?.f_to_device(device)?,
        })
    }

    /// bitsandbytes' signed (`dynamic`) or unsigned (`udynamic`) dynamic map.
    pub fn dynamic(signed: bool, device: Device) -> Result<QuantMap> {
        QuantMap::new(&dynamic_map(signed)?, device)
    }
}

/// bitsandbytes' `build_quantize_lut`: for grid point `-1 + 2i/65535` (float32), the number of
/// midpoints `0.5 · (c[j] + c[j+1])` strictly below it (at most 255).
fn lookup_table(code: &[f32]) -> Vec<u8> {
    let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
    let mut index = 0usize;
    (0..GRID_SIZE)
        .map(|i| {
            let grid = -1.0f32 + (2.0f32 * i as f32) / (GRID_SIZE - 1) as f32;
            while index < midpoints.len() && midpoints[index] < grid {
                index += 1;
            }
            index as u8
        })
        .collect()
}

/// The number of blocks of `block_size` that `numel` elements make (the last may be partial).
pub fn block_count(numel: i64, block_size: i64) -> i64 {
    (numel + block_size - 1) / block_size
}

/// bitsandbytes' `quantize_blockwise(x, code, blocksize)` on the CPU: the tensor (float32,
/// bfloat16 or float16, any shape) flattened into blocks of `block_size` (the last may be
/// partial), each block's absmax (float32 [blocks]) and each value's map index (uint8, `x`'s
/// shape). Returns `(codes, absmax)` on `x`'s device.
pub fn quantize_blockwise(x: &Tensor, map: &QuantMap, block_size: i64) -> Result<(Tensor, Tensor)> {
    ensure!(block_size > 0, "block size must be positive, got {block_size}");
    ensure!(
        matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Half),
        "block-wise quantisation takes float32, bfloat16 or float16, not {:?}",
        x.kind()
    );
    let flat = x.f_reshape([-1])?;
    let numel = flat.numel() as i64;
    if numel == 0 {
        return Ok((
            Tensor::f_zeros(x.size(), (Kind::Uint8, x.device()))?,
            Tensor::f_zeros([0], (Kind::Float, x.device()))?,
        ));
    }
    let chunk = (CHUNK_ELEMENTS / block_size).max(1) * block_size;
    let (mut codes, mut absmax) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < numel {
        let len = chunk.min(numel - start);
        let (c, a) = quantize_chunk(&flat.f_narrow(0, start, len)?, map, block_size)?;
        codes.push(c);
        absmax.push(a);
        start += len;
    }
    Ok((Tensor::f_cat(&codes, 0)?.f_reshape(x.size())?, Tensor::f_cat(&absmax, 0)?))
}

/// One run of whole blocks (the last may be partial) of a flat tensor.
fn quantize_chunk(flat: &Tensor, map: &QuantMap, block_size: i64) -> Result<(Tensor, Tensor)> {
    let numel = flat.size()[0];
    let blocks = block_count(numel, block_size);
    let padded = flat.f_to_kind(Kind::Float)?.f_constant_pad_nd([0, blocks * block_size - numel])?;
    let values = padded.f_view([blocks, block_size])?;
    let absmax = values.f_abs()?.f_amax([1], false)?;
    let empty = absmax.f_eq(0.0)?;
    // 1 / absmax in float32, as the C code; a zero block is scaled by 0 and coded 0 below
    let inverse = absmax.f_reciprocal()?.f_masked_fill(&empty, 0.0)?;
    let scaled = values.f_mul(&inverse.f_unsqueeze(1)?)?.f_clamp(-1.0, 1.0)?;
    // (s + 1) · 0.5 · 65535 + 0.5, truncated: the grid point (float32 steps, as the C code)
    let grid = scaled
        .f_add_scalar(1.0)?
        .f_mul_scalar(0.5)?
        .f_mul_scalar((GRID_SIZE - 1) as f64)?
        .f_add_scalar(0.5)?
        .f_to_kind(Kind::Int)?;
    let codes = map.lut.f_index_select(0, &grid.f_reshape([-1])?)?.f_view([blocks, block_size])?;
    let codes = codes.f_masked_fill(&empty.f_unsqueeze(1)?, 0)?;
    Ok((codes.f_reshape([-1])?.f_narrow(0, 0, numel)?, absmax))
}

/// bitsandbytes' `dequantize_blockwise(codes, absmax, code, blocksize)` in float32:
/// `code[codes[i]] · absmax[i / block_size]`, `codes`' shape.
pub fn dequantize_blockwise(codes: &Tensor, absmax: &Tensor, map: &QuantMap, block_size: i64) -> Result<Tensor> {
    ensure!(block_size > 0, "block size must be positive, got {block_size}");
    ensure!(codes.kind() == Kind::Uint8, "8-bit codes are uint8, not {:?}", codes.kind());
    let numel = codes.numel() as i64;
    let blocks = block_count(numel, block_size);
    ensure!(
        absmax.size() == [blocks],
        "{numel} codes in blocks of {block_size} need {blocks} absmax values, got shape {:?}",
        absmax.size()
    );
    let values = map.code.f_index_select(0, &codes.f_reshape([-1])?.f_to_kind(Kind::Int64)?)?;
    let values = values.f_constant_pad_nd([0, blocks * block_size - numel])?.f_view([blocks, block_size])?;
    let scaled = values.f_mul(&absmax.f_to_kind(Kind::Float)?.f_unsqueeze(1)?)?;
    Ok(scaled.f_reshape([-1])?.f_narrow(0, 0, numel)?.f_reshape(codes.size())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_have_their_end_points_and_the_table_covers_every_index() {
        let signed: Vec<f32> = Vec::try_from(dynamic_map(true).unwrap()).unwrap();
        let unsigned: Vec<f32> = Vec::try_from(dynamic_map(false).unwrap()).unwrap();
        assert_eq!((signed.len(), unsigned.len()), (MAP_SIZE, MAP_SIZE));
        assert_eq!((signed[255], unsigned[255], unsigned[0]), (1.0, 1.0, 0.0));
        assert!(signed[0] < -0.99 && signed.contains(&0.0));
        let lut = lookup_table(&signed);
        assert_eq!((lut[0], lut[GRID_SIZE - 1]), (0, 255));
        // monotone; near 0 the map is finer than the grid, so some entries are never chosen
        assert!(lut.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_zero_block_is_coded_zero_and_dequantises_to_zero() {
        let map = QuantMap::dynamic(true, Device::Cpu).unwrap();
        let x = Tensor::cat(&[Tensor::zeros([4], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[0.5f32, -1.0])], 0);
        let (codes, absmax) = quantize_blockwise(&x, &map, 4).unwrap();
        assert_eq!(Vec::<u8>::try_from(&codes.narrow(0, 0, 4)).unwrap(), [0, 0, 0, 0]);
        assert_eq!(Vec::<f32>::try_from(&absmax).unwrap(), [0.0, 1.0]);
        let back = dequantize_blockwise(&codes, &absmax, &map, 4).unwrap();
        assert_eq!(Vec::<f32>::try_from(&back.abs()).unwrap()[..4], [0.0; 4]);
        assert!(quantize_blockwise(&x, &map, 0).is_err());
        assert!(dequantize_blockwise(&codes, &absmax.narrow(0, 0, 1), &map, 4).is_err());
    }
}
