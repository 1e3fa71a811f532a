//! MinHash signatures over character n-gram shingles and LSH banding: near-duplicate candidates
//! for any script (Chinese text has no spaces, so shingles are characters, not words), with
//! bands × rows chosen for a Jaccard threshold.

/// A 64-bit mixer (SplitMix64's finaliser): a bijection, so `mix(h ^ seed)` is a seeded hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over the UTF-8 bytes of `chars`.
fn fnv1a(chars: &[char]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    let mut buf = [0u8; 4];
    for c in chars {
        for b in c.encode_utf8(&mut buf).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    mix(h)
}

/// The set of character `n`-grams of `text` as sorted, distinct 64-bit hashes. A text shorter
/// than `n` characters is one shingle; an empty text has none.
pub fn shingles(text: &str, n: usize) -> Vec<u64> {
    let chars: Vec<char> = text.chars().collect();
    let n = n.max(1);
    let mut out: Vec<u64> = if chars.len() <= n {
        if chars.is_empty() {
            Vec::new()
        } else {
            vec![fnv1a(&chars)]
        }
    } else {
        chars.windows(n).map(fnv1a).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Exact Jaccard similarity of two sorted, distinct sets (1 for two empty sets).
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    both as f64 / (a.len() + b.len() - both) as f64
}

/// MinHash with `permutations` seeded hash functions (`mix(h ^ seed_i)`, the seeds drawn from
/// SplitMix64).
#[derive(Debug, Clone)]
pub struct MinHasher {
    seeds: Vec<u64>,
}

impl MinHasher {
    pub fn new(permutations: usize, seed: u64) -> Self {
        let mut rng = crate::data::SplitMix64::new(seed);
        MinHasher { seeds: (0..permutations).map(|_| rng.next_u64()).collect() }
    }

    /// The signature of a shingle set: per hash function, the smallest hash of any shingle
    /// (`u64::MAX` everywhere for an empty set).
    pub fn signature(&self, shingles: &[u64]) -> Vec<u64> {
        self.seeds.iter().map(|&s| shingles.iter().map(|&h| mix(h ^ s)).min().unwrap_or(u64::MAX)).collect()
    }
}

/// The share of equal positions of two signatures: an estimate of their sets' Jaccard.
pub fn estimated_jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() {
        return 0.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// The probability that two sets of Jaccard `s` share at least one band of `rows` rows among
/// `bands` bands.
pub fn candidate_probability(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

/// Bands and rows (bands × rows ≤ `permutations`) for a Jaccard `threshold`: the most rows per
/// band (fewest chance candidates) for which a pair at the threshold becomes a candidate with
/// probability ≥ 0.99, using as many bands as the permutations allow. Candidates are verified,
/// so the choice favours not missing a pair over checking fewer.
pub fn lsh_params(threshold: f64, permutations: usize) -> (usize, usize) {
    let permutations = permutations.max(1);
    for rows in (1..=permutations).rev() {
        let bands = permutations / rows;
        if candidate_probability(threshold, bands, rows) >= 0.99 {
            return (bands, rows);
        }
    }
    (permutations, 1)
}

/// The band keys of a signature: one hash per band of `rows` consecutive values, mixed with
/// the band's number so equal values in different bands do not collide.
pub fn band_keys(signature: &[u64], bands: usize, rows: usize) -> Vec<u64> {
    (0..bands)
        .map(|b| {
            let mut h = mix(b as u64 + 1);
            for &v in &signature[b * rows..(b + 1) * rows] {
                h = mix(h ^ v);
            }
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jaccard_of_shingles() {
        let a = shingles("abcdefg", 5); // abcde bcdef cdefg
        let b = shingles("abcdefh", 5); // abcde bcdef cdefh
        assert_eq!(a.len(), 3);
        assert!((jaccard(&a, &b) - 0.5).abs() < 1e-12);
        assert_eq!(jaccard(&a, &a), 1.0);
        assert_eq!(shingles("abc", 5).len(), 1);
        assert!(shingles("", 5).is_empty());
        assert_eq!(shingles("发烧怎么办多喝水", 5).len(), 4);
    }

    #[test]
    fn minhash_estimates_jaccard() {
        let h = MinHasher::new(256, 7);
        let text: String = (0..400).map(|i| char::from_u32(0x4E00 + (i * 7919 % 2000)).unwrap()).collect();
        let other: String = text.chars().take(300).collect();
        let (a, b) = (shingles(&text, 5), shingles(&other, 5));
        let exact = jaccard(&a, &b);
        let est = estimated_jaccard(&h.signature(&a), &h.signature(&b));
        assert!((est - exact).abs() < 0.1, "estimate {est} vs exact {exact}");
    }

    #[test]
    fn lsh_params_catch_pairs_at_the_threshold() {
        let (b, r) = lsh_params(0.8, 128);
        assert!(b * r <= 128);
        assert!(candidate_probability(0.8, b, r) >= 0.99);
        assert!(candidate_probability(0.3, b, r) < 0.05, "unrelated texts rarely collide: {b}x{r}");
        let (b5, r5) = lsh_params(0.5, 128);
        assert!(r5 <= r && b5 >= b);
    }
}
