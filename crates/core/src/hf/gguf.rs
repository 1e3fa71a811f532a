//! GGUF v3 files (llama.cpp's and Ollama's model format) written by name, knowing no model: the
//! header, typed metadata, tensor infos in GGML's dimension order, 32-byte-aligned data, and the
//! encodings of the stored tensor types (F32, F16, BF16, and Q8_0 as ggml's reference quantiser
//! and gguf-py's `quants.py` compute it). The file is written through a temporary sibling and
//! renamed into place when complete.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::hf::folder::write_file_streamed;

/// "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the data section and of every tensor in it (`general.alignment`).
pub const GGUF_ALIGNMENT: u64 = 32;
/// `general.quantization_version` (ggml's GGML_QNT_VERSION).
pub const GGML_QUANT_VERSION: u32 = 2;
/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// The tensor types this writer stores (GGML's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32 values along a row: one f16 scale d = max|x| / 127, then 32 int8 round(x / d).
    Q8_0,
}

impl GgmlType {
    /// The id stored in a tensor info (`GGMLQuantizationType`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
        }
    }

    /// (values per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (Q8_0_BLOCK, 2 + Q8_0_BLOCK),
        }
    }

    /// Whether a tensor whose rows (its last PyTorch dimension, GGML's ne0) hold `row` values can
    /// be stored in this type: a quantised row is a whole number of blocks.
    pub fn fits_row(self, row: usize) -> bool {
        row % self.block().0 == 0
    }

    /// Bytes of a tensor of `shape` (PyTorch order) in this type.
    pub fn nbytes(self, shape: &[usize]) -> Result<usize> {
        let (block, size) = self.block();
        let row = shape.last().copied().unwrap_or(1);
        if !self.fits_row(row) {
            bail!("a {} tensor needs rows of a multiple of {block} values, found shape {shape:?}", self.name());
        }
        Ok(shape.iter().product::<usize>() / block * size)
    }
}

/// A metadata value, with the GGUF value type it is stored as.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl GgufValue {
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U32(_) => TYPE_U32,
            GgufValue::I32(_) => TYPE_I32,
            GgufValue::F32(_) => TYPE_F32,
            GgufValue::Bool(_) => TYPE_BOOL,
            GgufValue::String(_) => TYPE_STRING,
            GgufValue::Strings(_) | GgufValue::I32s(_) => TYPE_ARRAY,
        }
    }

    /// The value type, then the value.
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.type_id().to_le_bytes());
        match self {
            GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            GgufValue::Bool(v) => out.push(u8::from(*v)),
            GgufValue::String(s) => put_string(out, s),
            GgufValue::Strings(items) => {
                out.extend_from_slice(&TYPE_STRING.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    put_string(out, s);
                }
            }
            GgufValue::I32s(items) => {
                out.extend_from_slice(&TYPE_I32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// One tensor of the file: its GGUF name, PyTorch-order shape and stored type.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

fn padding(pos: u64) -> usize {
    ((GGUF_ALIGNMENT - pos % GGUF_ALIGNMENT) % GGUF_ALIGNMENT) as usize
}

/// Writes one GGUF file in order: [`GgufWriter::begin`] writes header, metadata and tensor infos
/// (offsets computed from the types and shapes), then [`GgufWriter::write_tensor`] takes the
/// tensors' bytes in the order of the infos, and [`GgufWriter::finish`] checks all were given.
pub struct GgufWriter<W: Write> {
    out: W,
    tensors: Vec<(GgufTensorInfo, usize)>,
    next: usize,
    pos: u64,
}

impl<W: Write> GgufWriter<W> {
    pub fn begin(out: W, metadata: &[(String, GgufValue)], tensors: Vec<GgufTensorInfo>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for (key, _) in metadata {
            if !seen.insert(key.as_str()) {
                bail!("GGUF metadata key '{key}' given twice");
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut sized = Vec::with_capacity(tensors.len());
        for t in tensors {
            if !names.insert(t.name.clone()) {
                bail!("GGUF tensor '{}' given twice", t.name);
            }
            let n = t.ty.nbytes(&t.shape).with_context(|| format!("GGUF tensor '{}'", t.name))?;
            sized.push((t, n));
        }
        let mut head = Vec::new();
        head.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        head.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        head.extend_from_slice(&(sized.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut head, key);
            value.encode(&mut head);
        }
        let mut offset = 0u64;
        for (t, n) in &sized {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            // GGML's ne0 is the fastest-varying dimension: PyTorch's shape reversed
            for d in t.shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += *n as u64 + padding(*n as u64) as u64;
        }
        head.resize(head.len() + padding(head.len() as u64), 0);
        let mut w = GgufWriter { out, tensors: sized, next: 0, pos: 0 };
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).context("cannot write the GGUF file")?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// The info of the tensor whose bytes come next, if any.
    pub fn next_tensor(&self) -> Option<&GgufTensorInfo> {
        self.tensors.get(self.next).map(|(t, _)| t)
    }

    /// The bytes of tensor `name`, which must be the next one of the infos.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (info, n) = self
            .tensors
            .get(self.next)
            .ok_or_else(|| anyhow!("GGUF tensor '{name}': all {} tensors were already written", self.tensors.len()))?;
        if info.name != name {
            bail!("GGUF tensor '{name}' given where '{}' comes next", info.name);
        }
        if bytes.len() != *n {
            bail!(
                "GGUF tensor '{name}': {} bytes given, its {} shape {:?} needs {n}",
                bytes.len(),
                info.ty.name(),
                info.shape
            );
        }
        self.put(bytes)?;
        let pad = vec![0u8; padding(self.pos)];
        self.put(&pad)?;
        self.next += 1;
        Ok(())
    }

    /// Checks every tensor was written and flushes; returns the output and the bytes written.
    pub fn finish(mut self) -> Result<(W, u64)> {
        if let Some((t, _)) = self.tensors.get(self.next) {
            bail!("GGUF tensor '{}' was never written ({} of {} written)", t.name, self.next, self.tensors.len());
        }
        self.out.flush().context("cannot write the GGUF file")?;
        Ok((self.out, self.pos))
    }
}

/// Writes a GGUF file at `path` (through a temporary sibling renamed into place when complete):
/// `fill` hands [`GgufWriter::write_tensor`] every tensor's bytes in the order of `tensors`.
/// Returns the file's size.
pub fn write_gguf_file(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: Vec<GgufTensorInfo>,
    fill: impl FnOnce(&mut GgufWriter<BufWriter<&mut File>>) -> Result<()>,
) -> Result<u64> {
    let mut size = 0;
    write_file_streamed(path, |file| {
        let mut w = GgufWriter::begin(BufWriter::with_capacity(1 << 20, file), metadata, tensors)?;
        fill(&mut w)?;
        let (out, n) = w.finish()?;
        out.into_inner().map_err(|e| anyhow!("{}: cannot write: {}", path.display(), e.error()))?;
        size = n;
        Ok(())
    })
    .with_context(|| format!("{}: cannot write the GGUF file", path.display()))?;
    Ok(size)
}

/// The IEEE half-precision bits of `x`, rounded to nearest even (as numpy's `astype(float16)` and
/// ggml's FP32→FP16 conversion round).
pub fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        let nan = if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // a subnormal half (or zero): value = r · 2⁻²⁴
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1u32 << shift) - 1);
        let mut r = m >> shift;
        if rest > half || (rest == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && r & 1 == 1) {
        // a carry into the exponent is the correct rounding (up to infinity)
        r += 1;
    }
    sign | r as u16
}

/// Q8_0 blocks of `values` (a whole number of 32-value blocks), bit for bit as ggml's reference
/// `quantize_row_q8_0` and gguf-py's `Q8_0.quantize_blocks`: d = max|x| / 127 in f32, q =
/// round-half-away-from-zero(x · (1/d)) (0 where d = 0), stored as the f16 of d then 32 int8.
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<u8>> {
    if values.len() % Q8_0_BLOCK != 0 {
        bail!("Q8_0 needs a multiple of {Q8_0_BLOCK} values, found {}", values.len());
    }
    let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * (2 + Q8_0_BLOCK));
    for block in values.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16_bits(d).to_le_bytes());
        out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
    }
    Ok(out)
}

/// The bytes of a floating tensor stored as `ty` (its values first made f32, on the CPU, row-major).
pub fn encode_tensor(t: &Tensor, ty: GgmlType) -> Result<Vec<u8>> {
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
    let stored = match ty {
        GgmlType::F32 | GgmlType::Q8_0 => t,
        GgmlType::F16 => t.f_to_kind(Kind::Half)?,
        GgmlType::BF16 => t.f_to_kind(Kind::BFloat16)?,
    }
    .f_contiguous()?;
    let numel = stored.numel();
    let mut bytes = vec![0u8; numel * stored.kind().elt_size_in_bytes()];
    stored.f_copy_data_u8(&mut bytes, numel)?;
    if ty != GgmlType::Q8_0 {
        return Ok(bytes);
    }
    let values: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    quantize_q8_0(&values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounding_equals_libtorch() {
        let mut xs: Vec<f32> =
            vec![0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e-8, 6e-8, 3e-8, 2.98e-8, 6.1e-5, f32::INFINITY];
        let mut s = 12345u64;
        for _ in 0..20000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let e = ((s >> 33) % 40) as i32 - 30;
            let m = ((s >> 11) & 0xfffff) as f32 / 1048576.0 + 1.0;
            xs.push(if s & 1 == 0 { m } else { -m } * 2f32.powi(e));
        }
        let t = Tensor::from_slice(&xs).to_kind(Kind::Half);
        let mut want = vec![0u8; xs.len() * 2];
        t.copy_data_u8(&mut want, xs.len());
        for (i, x) in xs.iter().enumerate() {
            let w = u16::from_le_bytes([want[2 * i], want[2 * i + 1]]);
            assert_eq!(f16_bits(*x), w, "{x:e}");
        }
    }

    #[test]
    fn q8_0_blocks_round_half_away_and_keep_zero_blocks() {
        let mut v = vec![0f32; 64];
        v[0] = 127.0;
        v[1] = -63.5; // exactly half-way: rounds away from zero
        v[2] = 0.49;
        let q = quantize_q8_0(&v).unwrap();
        assert_eq!(q.len(), 68);
        assert_eq!(u16::from_le_bytes([q[0], q[1]]), f16_bits(1.0));
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, -64);
        assert_eq!(q[4] as i8, 0);
        // the all-zero block: d = 0, q = 0
        assert!(q[34..].iter().all(|b| *b == 0));
        assert!(quantize_q8_0(&[1.0; 33]).is_err());
    }

    #[test]
    fn layout_header_metadata_infos_and_aligned_data() {
        let meta = vec![
            ("general.architecture".to_string(), GgufValue::String("llama".into())),
            ("llama.block_count".to_string(), GgufValue::U32(2)),
            ("tokenizer.ggml.tokens".to_string(), GgufValue::Strings(vec!["a".into(), "bc".into()])),
        ];
        let tensors = vec![
            GgufTensorInfo { name: "a".into(), shape: vec![3], ty: GgmlType::F32 },
            GgufTensorInfo { name: "b".into(), shape: vec![2, 32], ty: GgmlType::Q8_0 },
        ];
        let mut w = GgufWriter::begin(Vec::new(), &meta, tensors).unwrap();
        assert!(w.write_tensor("b", &[0; 68]).is_err(), "out of order");
        w.write_tensor("a", &[1; 12]).unwrap();
        assert!(w.write_tensor("b", &[0; 67]).is_err(), "wrong size");
        w.write_tensor("b", &[2; 68]).unwrap();
        let (bytes, n) = w.finish().unwrap();
        assert_eq!(n as usize, bytes.len());
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 3);
        // data: a at the first aligned offset, then b at the next multiple of 32
        let start = bytes.len() - 32 - 96;
        assert_eq!(start % 32, 0);
        assert_eq!(&bytes[start..start + 12], &[1; 12]);
        assert_eq!(&bytes[start + 32..start + 100], &[2; 68]);
        let w = GgufWriter::begin(
            Vec::new(),
            &meta,
            vec![GgufTensorInfo { name: "a".into(), shape: vec![3], ty: GgmlType::F32 }],
        )
        .unwrap();
        assert!(w.finish().is_err(), "a tensor left unwritten");
    }
}
