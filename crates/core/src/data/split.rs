//! Deterministic shuffling and train/validation splits from a seed (SplitMix64).

/// The SplitMix64 generator: small, fast and the same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`, by Lemire's multiply-shift with rejection (unbiased); 0 when `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Shuffles `items` in place (Fisher–Yates) with a seed.
pub fn shuffle_in_place<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// Splits `0..n` into train and validation indices (both sorted). The validation set has
/// `round(n * val_ratio)` indices, at least 1 when `val_ratio > 0` and `n >= 2`, and never all
/// of them; `val_ratio <= 0` (or NaN) gives no validation set. The same seed gives the same split.
pub fn split_by_ratio(n: usize, val_ratio: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let n_val = if val_ratio > 0.0 && n >= 2 { ((n as f64 * val_ratio).round() as usize).clamp(1, n - 1) } else { 0 };
    let mut order: Vec<usize> = (0..n).collect();
    shuffle_in_place(&mut order, seed);
    let mut val = order[..n_val].to_vec();
    let mut train = order[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

/// Splits records into (train, validation) with [`split_by_ratio`], keeping their order.
pub fn split_records<T>(records: Vec<T>, val_ratio: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let (_, val_idx) = split_by_ratio(records.len(), val_ratio, seed);
    let mut is_val = vec![false; records.len()];
    for i in val_idx {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (record, v) in records.into_iter().zip(is_val) {
        if v {
            val.push(record);
        } else {
            train.push(record);
        }
    }
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // First outputs for seed 0 (reference implementation by Sebastiano Vigna).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn split_is_deterministic_and_covers_everything() {
        let (t1, v1) = split_by_ratio(100, 0.1, 7);
        let (t2, v2) = split_by_ratio(100, 0.1, 7);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!(v1.len(), 10);
        let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let (_, v3) = split_by_ratio(100, 0.1, 8);
        assert_ne!(v1, v3, "another seed gives another split");
        assert_eq!(split_by_ratio(2, 0.01, 1).1.len(), 1, "at least one validation record");
        assert_eq!(split_by_ratio(5, 0.99, 1).0.len(), 1, "at least one training record");
        assert_eq!(split_by_ratio(1, 0.5, 1), (vec![0], vec![]));
        assert_eq!(split_by_ratio(10, 0.0, 1).1.len(), 0);
        let (train, val) = split_records((0..10).collect::<Vec<_>>(), 0.3, 3);
        assert_eq!(val, split_by_ratio(10, 0.3, 3).1);
        assert_eq!(train.len(), 7);
    }
}
