//! Deterministic shuffling, train/validation splits and train/validation/test splits from a seed
//! (SplitMix64).

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
    let n_val = held_out(n, val_ratio, n.saturating_sub(1));
    let mut parts = shuffled_parts(n, &[n_val], seed);
    let train = parts.pop().unwrap_or_default();
    (train, parts.pop().unwrap_or_default())
}

/// How many of `n` indices a ratio holds out: `round(n * ratio)`, at least 1 and at most `room`
/// when `ratio > 0` and `room >= 1`, else none (NaN included).
fn held_out(n: usize, ratio: f64, room: usize) -> usize {
    if ratio > 0.0 && room >= 1 {
        ((n as f64 * ratio).round() as usize).clamp(1, room)
    } else {
        0
    }
}

/// `0..n` shuffled with `seed` and cut into parts of the `held` sizes in order, then the rest;
/// each part sorted.
fn shuffled_parts(n: usize, held: &[usize], seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle_in_place(&mut order, seed);
    let mut parts = Vec::with_capacity(held.len() + 1);
    let mut start = 0;
    for &k in held.iter().chain(std::iter::once(&(n - held.iter().sum::<usize>()))) {
        let mut part = order[start..start + k].to_vec();
        part.sort_unstable();
        parts.push(part);
        start += k;
    }
    parts
}

/// Splits `0..n` into train, validation and test indices (each sorted) from one seeded shuffle:
/// the first `round(n * val_ratio)` shuffled indices are validation, the next
/// `round(n * test_ratio)` test, the rest train — so with `test_ratio = 0` the split is exactly
/// [`split_by_ratio`]'s. A ratio > 0 holds out at least 1 index when there are enough, and at
/// least 1 index is always left for training. Errors on ratios outside [0, 1) or summing to ≥ 1.
pub fn split_three_ways(
    n: usize,
    val_ratio: f64,
    test_ratio: f64,
    seed: u64,
) -> anyhow::Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    for (name, r) in [("validation", val_ratio), ("test", test_ratio)] {
        if !(0.0..1.0).contains(&r) {
            anyhow::bail!("{name} ratio: expected a number in [0, 1), found {r}");
        }
    }
    if val_ratio + test_ratio >= 1.0 {
        anyhow::bail!("validation + test ratios: expected less than 1 in all, found {}", val_ratio + test_ratio);
    }
    let n_val = held_out(n, val_ratio, n.saturating_sub(1));
    let n_test = held_out(n, test_ratio, n.saturating_sub(1 + n_val));
    let mut parts = shuffled_parts(n, &[n_val, n_test], seed).into_iter();
    let (val, test, train) =
        (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    Ok((train, val, test))
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

    #[test]
    fn three_way_split_is_deterministic_disjoint_and_covering() {
        let (tr, va, te) = split_three_ways(100, 0.1, 0.2, 11).unwrap();
        assert_eq!((tr.len(), va.len(), te.len()), (70, 10, 20));
        assert_eq!(split_three_ways(100, 0.1, 0.2, 11).unwrap(), (tr.clone(), va.clone(), te.clone()));
        let mut all: Vec<usize> = tr.iter().chain(&va).chain(&te).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>(), "disjoint and covering");
        let (tr2, va2, te2) = split_three_ways(100, 0.1, 0.0, 11).unwrap();
        assert_eq!((tr2, va2), split_by_ratio(100, 0.1, 11), "no test set: the train/validation split");
        assert!(te2.is_empty());
        assert_ne!(split_three_ways(100, 0.1, 0.2, 12).unwrap().2, te);
        assert_eq!(split_three_ways(3, 0.01, 0.01, 1).unwrap().0.len(), 1);
        assert_eq!(
            split_three_ways(2, 0.5, 0.5, 1).map_err(|e| e.to_string()).unwrap_err(),
            "validation + test ratios: expected less than 1 in all, found 1"
        );
        assert_eq!(split_three_ways(2, 0.4, 0.4, 1).unwrap().0.len(), 1);
    }
}
