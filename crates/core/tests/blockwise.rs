//! 8-bit block-wise quantisation against bitsandbytes: the fixture
//! `tests/fixtures/blockwise.safetensors` made by `tests/fixtures/make_blockwise_fixtures.py`
//! with bitsandbytes' own CPU code (maps, codes, absmax, dequantised values).
use std::collections::BTreeMap;
use std::path::Path;

use align_core::model::blockwise::{dequantize_blockwise, dynamic_map, quantize_blockwise, QuantMap};
use tch::{Device, Tensor};

fn fixture() -> BTreeMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blockwise.safetensors");
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn dynamic_maps_are_bitsandbytes_maps_bit_for_bit() {
    let f = fixture();
    assert_eq!(bits(&dynamic_map(true).unwrap()), bits(&f["dynamic_signed"]));
    assert_eq!(bits(&dynamic_map(false).unwrap()), bits(&f["dynamic_unsigned"]));
}

#[test]
fn codes_absmax_and_dequantised_values_equal_bitsandbytes() {
    let f = fixture();
    let maps = [QuantMap::dynamic(false, Device::Cpu).unwrap(), QuantMap::dynamic(true, Device::Cpu).unwrap()];
    let cases: Vec<&str> = f.keys().filter_map(|k| k.strip_suffix(".input")).collect();
    assert!(cases.len() >= 10, "cases in the fixture: {cases:?}");
    for case in cases {
        let get = |field: &str| &f[&format!("{case}.{field}")];
        let block_size = get("block_size").int64_value(&[0]);
        let map = &maps[get("signed").int64_value(&[0]) as usize];
        let (codes, absmax) = quantize_blockwise(get("input"), map, block_size).unwrap();
        assert_eq!(codes.size(), get("input").size(), "{case}: shape");
        let want = Vec::<u8>::try_from(get("codes").flatten(0, -1)).unwrap();
        let got = Vec::<u8>::try_from(codes.flatten(0, -1)).unwrap();
        let wrong: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
        assert!(
            wrong.is_empty(),
            "{case}: {} of {} codes differ, first at {:?}",
            wrong.len(),
            want.len(),
            wrong.first()
        );
        assert_eq!(bits(&absmax), bits(get("absmax")), "{case}: absmax");
        let back = dequantize_blockwise(get("codes"), get("absmax"), map, block_size).unwrap();
        assert_eq!(bits(&back), bits(get("dequantized")), "{case}: dequantised values");
    }
}
