//! Quantised weights against bitsandbytes (fixtures of `tests/fixtures/make_bnb_fixtures.py`):
//! the packed nibbles, absmax bytes, nested state and dequantised values of NF4/FP4, and
//! LLM.int8 rows; then the quantised linear: its gradients equal a dense linear's holding the
//! dequantised weight, its backward keeps no dequantised weight alive, and a quantised model
//! holds only the quantised bytes.
use std::collections::HashMap;

use align_core::model::decoder::LinearWeight;
use align_core::model::io::{load_causal_lm, variable_bytes};
use align_core::model::quant::{
    quantize_4bit, quantize_int8_rows, tensor_bytes, BlockScales, QuantType4, Quantization, QuantizedWeight,
};
use align_core::model::quant_linear::quantized_linear;
use align_core::peft::lora::{attach_lora, merge_lora, LoraConfig};
use align_testkit::{fixture, tiny_model};
use tch::{Device, Kind, Tensor};

fn bnb() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture("bnb/quant.safetensors")).unwrap().into_iter().collect()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.contiguous().copy_data_u8(&mut out, t.numel());
    out
}

/// Asserts two tensors hold the same bytes, naming the first element that differs.
fn assert_same_bytes(have: &Tensor, want: &Tensor, what: &str) {
    assert_eq!((have.size(), have.kind()), (want.size(), want.kind()), "{what}: shape / dtype");
    let (h, w) = (bytes(have), bytes(want));
    if h != w {
        let elt = have.kind().elt_size_in_bytes();
        let i = h.iter().zip(&w).position(|(a, b)| a != b).unwrap() / elt;
        let (hf, wf) = (have.flatten(0, -1).get(i as i64), want.flatten(0, -1).get(i as i64));
        panic!(
            "{what}: element {i} differs: {} ({:?}) vs bitsandbytes {} ({:?})",
            hf.to_kind(Kind::Double).double_value(&[]),
            &h[i * elt..(i + 1) * elt],
            wf.to_kind(Kind::Double).double_value(&[]),
            &w[i * elt..(i + 1) * elt]
        );
    }
}

#[test]
fn codes_are_bitsandbytes_codes() {
    let _g = align_testkit::rng_lock(); // the memory test measures this process alone
    let codes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("bnb/codes.json")).unwrap()).unwrap();
    for qt in [QuantType4::Nf4, QuantType4::Fp4] {
        let want: Vec<f32> = serde_json::from_value(codes[qt.as_str()].clone()).unwrap();
        let have = qt.code();
        assert_eq!(want.len(), 16);
        for (i, (w, h)) in want.iter().zip(have).enumerate() {
            // FP4 index 8: get_4bit_type has +0, bnb's kernels decode the sign bit to -0
            if qt == QuantType4::Fp4 && i == 8 {
                assert!(*w == 0.0 && h == 0.0 && h.is_sign_negative());
                continue;
            }
            assert_eq!(w.to_bits(), h.to_bits(), "{}: {w} vs {h}", qt.as_str());
        }
    }
}

#[test]
fn four_bit_layout_is_bitsandbytes_layout_byte_for_byte() {
    let _g = align_testkit::rng_lock(); // the memory test measures this process alone
    let f = bnb();
    for w in ["w_f32", "w_bf16", "w_odd"] {
        let input = &f[w];
        for qt in [QuantType4::Nf4, QuantType4::Fp4] {
            let at = format!("{w}.{}", qt.as_str());
            let plain = quantize_4bit(input, qt, false).unwrap();
            assert_eq!(plain.packed.size(), f[&format!("{at}.packed")].size(), "{at}");
            assert_same_bytes(&plain.packed, &f[&format!("{at}.packed")], &format!("{at}: packed nibbles"));
            let BlockScales::Plain(absmax) = &plain.scales else { panic!("{at}: expected plain scales") };
            assert_same_bytes(absmax, &f[&format!("{at}.absmax")], &format!("{at}: absmax"));
            let dq = plain.dequantize(input.kind()).unwrap();
            assert_eq!(dq.kind(), input.kind());
            assert_same_bytes(&dq, &f[&format!("{at}.dequant")], &format!("{at}: dequantised values"));

            let nested = quantize_4bit(input, qt, true).unwrap();
            assert_same_bytes(&nested.packed, &plain.packed, &format!("{at}: nested packing"));
            let BlockScales::Nested { codes, absmax, offset } = &nested.scales else { panic!("{at}: not nested") };
            assert_same_bytes(codes, &f[&format!("{at}.dq.absmax")], &format!("{at}: nested absmax codes"));
            assert_same_bytes(absmax, &f[&format!("{at}.dq.absmax2")], &format!("{at}: nested absmax2"));
            assert_same_bytes(&offset.reshape([1]), &f[&format!("{at}.dq.offset")], &format!("{at}: offset"));
            let dq = nested.dequantize(input.kind()).unwrap();
            assert_same_bytes(&dq, &f[&format!("{at}.dq.dequant")], &format!("{at}: nested dequantised values"));
        }
    }
    let code2 = align_core::model::quant::nested_map(Device::Cpu).unwrap();
    assert_same_bytes(&code2.code, &f["code2"], "nested code");
}

#[test]
fn int8_rows_are_bitsandbytes_int8_params() {
    let _g = align_testkit::rng_lock(); // the memory test measures this process alone
    let f = bnb();
    let q = quantize_int8_rows(&f["w8"]).unwrap();
    assert_same_bytes(&q.cb, &f["w8.cb"], "CB");
    assert_same_bytes(&q.scb, &f["w8.scb"], "SCB");
    assert_same_bytes(&q.dequantize(Kind::Float).unwrap(), &f["w8.dequant"], "dequantised");
    // a zero row stays zero (no 0 · inf)
    let z = quantize_int8_rows(&Tensor::zeros([2, 8], (Kind::Float, Device::Cpu))).unwrap();
    assert_eq!(z.dequantize(Kind::Float).unwrap().abs().sum(Kind::Float).double_value(&[]), 0.0);
}

/// Gradients of `sum((x Wᵀ + lora) · g)` w.r.t. x, A and B with W quantised, and with a dense
/// W holding the dequantised values: equal.
#[test]
fn quantised_linear_gradients_equal_a_dense_linear_with_the_dequantised_weight() {
    let _g = align_testkit::rng_lock();
    tch::manual_seed(5);
    let w = Tensor::randn([96, 128], (Kind::Float, Device::Cpu)) * 0.05;
    for q in [
        Quantization::FourBit { quant_type: QuantType4::Nf4, double_quant: true },
        Quantization::FourBit { quant_type: QuantType4::Fp4, double_quant: false },
        Quantization::Int8,
    ] {
        let qw = QuantizedWeight::new(&w, q).unwrap();
        let dense = qw.dequantize(Kind::Float).unwrap();
        let x0 = Tensor::randn([3, 5, 128], (Kind::Float, Device::Cpu));
        let a0 = Tensor::randn([4, 128], (Kind::Float, Device::Cpu)) * 0.1;
        let b0 = Tensor::randn([96, 4], (Kind::Float, Device::Cpu)) * 0.1;
        let g = Tensor::randn([3, 5, 96], (Kind::Float, Device::Cpu));
        let run = |quantised: bool| {
            let x = x0.copy().set_requires_grad(true);
            let a = a0.copy().set_requires_grad(true);
            let b = b0.copy().set_requires_grad(true);
            let h = x.tanh(); // x's gradient flows through an op before the linear
            let base = if quantised { quantized_linear(&h, &qw).unwrap() } else { h.linear::<Tensor>(&dense, None) };
            let y = base + h.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None);
            (&y * &g).sum(Kind::Float).backward();
            (y.detach(), x.grad(), a.grad(), b.grad())
        };
        let (yq, xq, aq, bq) = run(true);
        let (yd, xd, ad, bd) = run(false);
        let at = q.describe();
        assert!(yq.allclose(&yd, 1e-6, 1e-6, false), "{at}: outputs");
        assert!(xq.allclose(&xd, 1e-6, 1e-6, false), "{at}: input gradients");
        assert!(aq.allclose(&ad, 1e-6, 1e-6, false), "{at}: lora_A gradients");
        assert!(bq.allclose(&bd, 1e-6, 1e-6, false), "{at}: lora_B gradients");
    }
}

extern "C" {
    /// glibc's `mallopt`: with a fixed mmap threshold (no dynamic raise) every large block is
    /// its own mapping, returned to the system when freed, so resident memory tracks tensors.
    fn mallopt(param: i32, value: i32) -> i32;
}
const M_MMAP_THRESHOLD: i32 = -3;

/// The same in the half-precision compute dtypes: the weight is dequantised to x's dtype.
#[test]
fn quantised_linear_computes_in_the_input_dtype() {
    let _g = align_testkit::rng_lock();
    tch::manual_seed(7);
    let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu)) * 0.05;
    let qw =
        QuantizedWeight::new(&w, Quantization::FourBit { quant_type: QuantType4::Nf4, double_quant: true }).unwrap();
    for kind in [Kind::BFloat16, Kind::Half] {
        let dense = qw.dequantize(kind).unwrap();
        assert_eq!(dense.kind(), kind);
        let x0 = Tensor::randn([4, 128], (kind, Device::Cpu));
        let g = Tensor::randn([4, 64], (kind, Device::Cpu));
        let run = |quantised: bool| {
            let x = x0.copy().set_requires_grad(true);
            let h = &x * 2.0;
            let y = if quantised { quantized_linear(&h, &qw).unwrap() } else { h.linear::<Tensor>(&dense, None) };
            assert_eq!(y.kind(), kind);
            (&y * &g).sum(Kind::Float).backward();
            (y.detach().to_kind(Kind::Float), x.grad().to_kind(Kind::Float))
        };
        let ((yq, gq), (yd, gd)) = (run(true), run(false));
        assert!(yq.allclose(&yd, 1e-2, 1e-2, false), "{kind:?}: outputs");
        assert!(gq.allclose(&gd, 1e-2, 1e-2, false), "{kind:?}: input gradients");
    }
}

/// Resident bytes of this process (Linux /proc/self/statm), for the memory check.
fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: i64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A stack of quantised linears run forward with the graph kept: the dense path holds every
/// dequantised weight until backward, the quantised linear none of them. Measured as resident
/// memory between forward and backward (the dequantised weights are 16 × 4 MiB).
#[test]
fn quantised_linear_backward_keeps_no_dequantised_weight_alive() {
    let _g = align_testkit::rng_lock();
    // SAFETY: a plain libc call made before the measured allocations
    assert_eq!(unsafe { mallopt(M_MMAP_THRESHOLD, 256 << 10) }, 1);
    tch::manual_seed(6);
    let (layers, dim) = (16, 1024);
    let weights: Vec<QuantizedWeight> = (0..layers)
        .map(|_| {
            let w = Tensor::randn([dim, dim], (Kind::Float, Device::Cpu)) * 0.03;
            QuantizedWeight::new(&w, Quantization::FourBit { quant_type: QuantType4::Nf4, double_quant: true }).unwrap()
        })
        .collect();
    let x0 = Tensor::randn([2, dim], (Kind::Float, Device::Cpu));
    let held_until_backward = |quantised: bool| -> i64 {
        let x = x0.copy().set_requires_grad(true);
        let before = rss_bytes();
        let mut h = x.shallow_clone();
        for w in &weights {
            h = if quantised {
                quantized_linear(&h, w).unwrap()
            } else {
                h.linear::<Tensor>(&w.dequantize(Kind::Float).unwrap(), None)
            };
        }
        let held = rss_bytes() - before;
        h.sum(Kind::Float).backward();
        assert!(x.grad().defined());
        held
    };
    let dense_bytes = layers * dim * dim * 4;
    // the allocator returns big blocks to the system at once, so resident memory tracks them
    let plain = held_until_backward(false);
    let quantised = held_until_backward(true);
    assert!(plain > dense_bytes * 3 / 4, "plain autograd should keep ~{dense_bytes} bytes, measured {plain}");
    assert!(quantised < dense_bytes / 8, "the quantised linear kept {quantised} bytes until backward");
    // and the gradients agree
    let grads: Vec<Tensor> = [true, false]
        .iter()
        .map(|&q| {
            let x = x0.copy().set_requires_grad(true);
            let mut h = x.shallow_clone();
            for w in &weights {
                h = if q {
                    quantized_linear(&h, w).unwrap()
                } else {
                    h.linear::<Tensor>(&w.dequantize(Kind::Float).unwrap(), None)
                };
            }
            h.sum(Kind::Float).backward();
            x.grad()
        })
        .collect();
    assert!(grads[0].allclose(&grads[1], 1e-4, 1e-5, false));
}

/// Quantising a model removes the dense projection weights from the `VarStore`: the model then
/// holds the rest of its variables plus the quantised bytes (about 0.53 bytes a weight for NF4
/// with double quantisation: 4 bits + 8 bits per 64 + 32 bits per 16384). Merging adapters into
/// it is refused.
#[test]
fn a_quantised_model_holds_only_the_quantised_projection_bytes() {
    let _g = align_testkit::rng_lock(); // the memory test measures this process alone
    let mut m = load_causal_lm(&tiny_model("tiny-llama"), Device::Cpu, Kind::Float).unwrap();
    let before = variable_bytes(&m.vs);
    let (mut dense_proj, mut n_proj) = (0i64, 0i64);
    for (_, lin) in m.lm.linears() {
        let w = lin.weight.dense().unwrap();
        dense_proj += tensor_bytes(w);
        n_proj += w.numel() as i64;
    }
    let q = Quantization::FourBit { quant_type: QuantType4::Nf4, double_quant: true };
    m.lm.model.quantize(&m.vs, q).unwrap();
    let names: Vec<String> = m.vs.variables().into_keys().collect();
    assert!(!names.iter().any(|n| n.ends_with("_proj.weight")), "{names:?}");
    assert_eq!(variable_bytes(&m.vs), before - dense_proj);
    let blocks = m.lm.linears().iter().map(|(_, l)| (l.weight.shape().iter().product::<i64>() + 63) / 64).sum::<i64>();
    let nested =
        m.lm.linears()
            .iter()
            .map(|(_, l)| ((l.weight.shape().iter().product::<i64>() + 63) / 64 + 255) / 256)
            .sum::<i64>();
    // packed nibbles + one code byte per block + f32 absmax per nested block + f32 offset
    let want = n_proj / 2 + blocks + 4 * nested + 4 * m.lm.linears().len() as i64;
    assert_eq!(m.lm.model.quantized_bytes(), want);
    assert!(m.lm.linears().iter().all(|(_, l)| matches!(l.weight, LinearWeight::Quantized(_))));
    // an adapter attaches on top; it is never merged into the quantised base
    attach_lora(&m.vs, &mut m.lm, &LoraConfig::default()).unwrap();
    let e = merge_lora(&m.vs, &mut m.lm).unwrap_err().to_string();
    assert!(e.contains("loaded quantised (nf4+double-quant)") && e.contains("full-precision base"), "{e}");
}
