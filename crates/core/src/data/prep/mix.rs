//! Mixing data sources by weight: how many records each source gives (the weights are shares of
//! the output, rounded to whole records by largest remainder), which records (seeded, without
//! replacement; upsampling only when asked), and the realised mix.
use anyhow::{bail, Result};
use serde::Serialize;

use crate::data::{shuffle_in_place, SplitMix64};

/// One source of a mix: its name (a file or pattern), its weight and how many records it has.
#[derive(Debug, Clone, PartialEq)]
pub struct MixSource {
    pub name: String,
    pub weight: f64,
    pub available: usize,
}

/// What a source gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixShare {
    pub source: String,
    pub weight: f64,
    pub available: usize,
    pub records: usize,
    /// `records` / the mix's total.
    pub share: f64,
    /// Records taken more than once (only with upsampling).
    pub repeated: usize,
}

/// Records per source for `total` records of the output (largest remainder: each source gets
/// the floor of `total × share`, the records left over go to the largest fractional parts, ties
/// to the earlier source). Without `total`, the largest total that no source is too small for.
/// A source asked for more records than it has is an error unless `upsample`.
pub fn mix_counts(sources: &[MixSource], total: Option<usize>, upsample: bool) -> Result<Vec<usize>> {
    if sources.is_empty() {
        bail!("mix: expected at least one source");
    }
    for s in sources {
        if !(s.weight.is_finite() && s.weight > 0.0) {
            bail!("mix: source {}: expected a weight > 0, found {}", s.name, s.weight);
        }
        if s.available == 0 {
            bail!("mix: source {}: has no records", s.name);
        }
    }
    let sum: f64 = sources.iter().map(|s| s.weight).sum();
    let shares: Vec<f64> = sources.iter().map(|s| s.weight / sum).collect();
    let round = |total: usize| -> Vec<usize> {
        let exact: Vec<f64> = shares.iter().map(|&w| w * total as f64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|&x| (x + 1e-9).floor() as usize).collect();
        let left = total.saturating_sub(counts.iter().sum());
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|&a, &b| {
            let (fa, fb) = (exact[a] - counts[a] as f64, exact[b] - counts[b] as f64);
            fb.partial_cmp(&fa).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        for &i in order.iter().take(left) {
            counts[i] += 1;
        }
        counts
    };
    let fits = |counts: &[usize]| counts.iter().zip(sources).all(|(&c, s)| c <= s.available);
    let total = match total {
        Some(t) => t,
        None => {
            let mut t = sources
                .iter()
                .zip(&shares)
                .map(|(s, &w)| (s.available as f64 / w + 1e-9).floor() as usize)
                .min()
                .unwrap_or(0);
            while t > 0 && !fits(&round(t)) {
                t -= 1;
            }
            t
        }
    };
    let counts = round(total);
    if !upsample {
        for (c, s) in counts.iter().zip(sources) {
            if *c > s.available {
                bail!(
                    "mix: source {} has {} records but {c} are needed for {total} records at weight {}; lower the total or allow upsampling (records repeated)",
                    s.name,
                    s.available,
                    s.weight
                );
            }
        }
    }
    Ok(counts)
}

/// The indices of the records a source of `available` records gives for `count`: a seeded
/// sample without replacement, in file order; with `count > available`, every record
/// `count / available` times plus a sample of the rest.
pub fn mix_sample(available: usize, count: usize, seed: u64) -> Vec<usize> {
    if available == 0 {
        return Vec::new();
    }
    let mut out: Vec<usize> = Vec::with_capacity(count);
    for _ in 0..count / available {
        out.extend(0..available);
    }
    let mut order: Vec<usize> = (0..available).collect();
    shuffle_in_place(&mut order, seed);
    out.extend_from_slice(&order[..count % available]);
    out.sort_unstable();
    out
}

/// Mixes sources of records: each source's records are sampled ([`mix_sample`], each source with
/// its own seed drawn from `seed`) and the output holds them source after source. Returns the
/// records and the realised shares.
pub fn mix_records<T: Clone>(
    sources: Vec<(MixSource, Vec<T>)>,
    total: Option<usize>,
    upsample: bool,
    seed: u64,
) -> Result<(Vec<T>, Vec<MixShare>)> {
    let specs: Vec<MixSource> = sources.iter().map(|(s, _)| s.clone()).collect();
    let counts = mix_counts(&specs, total, upsample)?;
    let total: usize = counts.iter().sum();
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(total);
    let mut shares = Vec::with_capacity(sources.len());
    for ((spec, records), count) in sources.into_iter().zip(counts) {
        let picked = mix_sample(records.len(), count, rng.next_u64());
        out.extend(picked.iter().map(|&i| records[i].clone()));
        shares.push(MixShare {
            source: spec.name,
            weight: spec.weight,
            available: spec.available,
            records: count,
            share: if total == 0 { 0.0 } else { count as f64 / total as f64 },
            repeated: count.saturating_sub(spec.available),
        });
    }
    Ok((out, shares))
}

/// The sources of `[data_options] mix` among the files of one read: for each key (in key
/// order), its weight and the indices of the files it names. Every file must be named by
/// exactly one key and every key must name at least one of the files; paths are compared after
/// resolving them (`./data/a.jsonl` is `data/a.jsonl`).
pub fn mix_groups(
    files: &[std::path::PathBuf],
    mix: &std::collections::BTreeMap<String, f64>,
) -> Result<Vec<(String, f64, Vec<usize>)>> {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let read: Vec<std::path::PathBuf> = files.iter().map(|f| canonical(f)).collect();
    let mut owner: Vec<Option<&str>> = vec![None; files.len()];
    let mut groups = Vec::with_capacity(mix.len());
    for (key, &weight) in mix {
        let named =
            crate::data::expand_data_paths(&[key]).map_err(|e| anyhow::anyhow!("data_options.mix.\"{key}\": {e}"))?;
        let mut members = Vec::new();
        for path in named {
            let c = canonical(&path);
            if let Some(i) = read.iter().position(|r| *r == c) {
                if let Some(other) = owner[i] {
                    bail!(
                        "data_options.mix: {} is named by both \"{other}\" and \"{key}\"; name each file once",
                        files[i].display()
                    );
                }
                owner[i] = Some(key.as_str());
                members.push(i);
            }
        }
        if members.is_empty() {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            bail!("data_options.mix.\"{key}\": names none of the data files ({})", names.join(", "));
        }
        groups.push((key.clone(), weight, members));
    }
    if let Some(i) = owner.iter().position(Option::is_none) {
        bail!(
            "data_options.mix: data file {} has no weight; add it to the mix (every data file needs one)",
            files[i].display()
        );
    }
    Ok(groups)
}

/// The realised mix in one line: `a.jsonl 800 (80.0%), b.jsonl 200 (20.0%)`.
pub fn describe_mix(shares: &[MixShare]) -> String {
    shares
        .iter()
        .map(|s| format!("{} {} of {} ({:.1}%)", s.source, s.records, s.available, s.share * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, weight: f64, available: usize) -> MixSource {
        MixSource { name: name.into(), weight, available }
    }

    #[test]
    fn counts_are_exact_shares() {
        let s = [src("a", 0.8, 1000), src("b", 0.2, 1000)];
        assert_eq!(mix_counts(&s, Some(100), false).unwrap(), vec![80, 20]);
        // without a total: as many as the smaller share allows
        assert_eq!(mix_counts(&[src("a", 0.8, 100), src("b", 0.2, 100)], None, false).unwrap(), vec![100, 25]);
        assert_eq!(mix_counts(&[src("a", 4.0, 40), src("b", 1.0, 100)], None, false).unwrap(), vec![40, 10]);
        // largest remainder: 1/3 each of 10
        assert_eq!(
            mix_counts(&[src("a", 1.0, 9), src("b", 1.0, 9), src("c", 1.0, 9)], Some(10), false).unwrap(),
            vec![4, 3, 3]
        );
        let e = mix_counts(&[src("a", 0.8, 10), src("b", 0.2, 100)], Some(100), false).unwrap_err().to_string();
        assert!(e.contains("source a has 10 records but 80 are needed"), "{e}");
        assert_eq!(mix_counts(&[src("a", 0.8, 10), src("b", 0.2, 100)], Some(100), true).unwrap(), vec![80, 20]);
        assert!(mix_counts(&[src("a", 0.0, 10)], None, false).is_err());
    }

    #[test]
    fn samples_are_seeded_and_without_replacement() {
        let a = mix_sample(10, 4, 1);
        assert_eq!(a, mix_sample(10, 4, 1));
        assert_ne!(a, mix_sample(10, 4, 2));
        let mut d = a.clone();
        d.dedup();
        assert_eq!(d.len(), 4);
        let up = mix_sample(3, 7, 5);
        assert_eq!(up.len(), 7);
        for i in 0..3 {
            assert!(up.iter().filter(|&&x| x == i).count() >= 2);
        }
        let (records, shares) = mix_records(
            vec![(src("a", 0.8, 100), (0..100).collect::<Vec<_>>()), (src("b", 0.2, 50), (100..150).collect())],
            Some(50),
            false,
            9,
        )
        .unwrap();
        assert_eq!(records.len(), 50);
        assert_eq!((shares[0].records, shares[1].records), (40, 10));
        assert_eq!(records.iter().filter(|&&r| r >= 100).count(), 10);
        assert!((shares[0].share - 0.8).abs() < 1e-12);
    }

    #[test]
    fn data_options_mix_applies_when_a_stage_reads() {
        use crate::data::{read_pretrain, DataOptions};
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (dir.path().join("a.txt"), dir.path().join("b.txt"), dir.path().join("c.txt"));
        let lines = |p: &str| (0..20).map(|i| format!("{p} {i}\n")).collect::<String>();
        std::fs::write(&a, lines("a")).unwrap();
        std::fs::write(&b, lines("b")).unwrap();
        std::fs::write(&c, lines("c")).unwrap();
        let key = |p: &std::path::Path| p.display().to_string();
        let options = DataOptions {
            mix: [(key(&a), 0.8), (key(&b), 0.2)].into_iter().collect(),
            mix_total: Some(10),
            ..DataOptions::default()
        };
        let docs = read_pretrain(&[&a, &b], &options).unwrap().records;
        let from_a = docs.iter().filter(|d| d.text.starts_with('a')).count();
        assert_eq!((docs.len(), from_a), (10, 8));
        let again = read_pretrain(&[&a, &b], &options).unwrap().records;
        assert_eq!(docs, again, "seeded");
        let other = DataOptions { seed: 7, ..options.clone() };
        assert_ne!(docs, read_pretrain(&[&a, &b], &other).unwrap().records);
        let e = read_pretrain(&[&a, &b, &c], &options).unwrap_err().to_string();
        assert!(e.contains("c.txt has no weight"), "{e}");
        let e = read_pretrain(&[&a], &options).unwrap_err().to_string();
        assert!(e.contains("names none of the data files"), "{e}");
        let e =
            read_pretrain(&[&a, &b], &DataOptions { mix_total: Some(30), ..options.clone() }).unwrap_err().to_string();
        assert!(e.contains("has 20 records but 24 are needed"), "{e}");
        assert_eq!(
            read_pretrain(&[&a, &b], &DataOptions { mix_total: Some(30), mix_upsample: true, ..options })
                .unwrap()
                .records
                .len(),
            30
        );
        let e = DataOptions { mix_total: Some(3), ..DataOptions::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("mix_total: only used with data_options.mix"), "{e}");
    }
}
