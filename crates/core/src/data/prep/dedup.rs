//! Finding duplicate records: exact duplicates of the normalised text ([`dedup_key`]) and near
//! duplicates by MinHash + LSH over character shingles, verified by their exact Jaccard; records
//! that duplicate an evaluation record are leaks. The first record of a group is kept.
use std::collections::HashMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::minhash::{band_keys, jaccard, lsh_params, shingles, MinHasher};
use super::normalize::dedup_key;

/// How duplicates are found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DedupConfig {
    /// Near duplicates: records whose shingle sets have a Jaccard similarity ≥ this.
    pub near_threshold: f64,
    /// Characters per shingle.
    pub shingle_size: usize,
    /// MinHash permutations (hash functions).
    pub permutations: usize,
    /// Seed of the MinHash functions.
    pub seed: u64,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig { near_threshold: 0.8, shingle_size: 5, permutations: 128, seed: 42 }
    }
}

impl DedupConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.near_threshold > 0.0 && self.near_threshold <= 1.0) {
            bail!("near threshold: expected a number in (0, 1], found {}", self.near_threshold);
        }
        if self.shingle_size == 0 || self.permutations == 0 {
            bail!("shingle size and permutations must be at least 1");
        }
        Ok(())
    }
}

/// Why a record is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropReason {
    /// Its normalised text equals an earlier record's.
    Exact,
    /// Its shingles are near an earlier record's (Jaccard ≥ the threshold).
    Near,
    /// It is an exact or near duplicate of an evaluation record.
    EvalLeak,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Exact => "exact",
            DropReason::Near => "near",
            DropReason::EvalLeak => "eval-leak",
        }
    }
}

/// A record that is kept and that a dropped one duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "set", content = "index")]
pub enum KeptRecord {
    Train(usize),
    Eval(usize),
}

/// One dropped training record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Duplicate {
    /// Index of the dropped record among the training texts.
    pub record: usize,
    pub reason: DropReason,
    pub of: KeptRecord,
    /// Jaccard similarity of the two shingle sets (1 for exact duplicates).
    pub similarity: f64,
}

/// Finds the training texts to drop: in order, a text whose key equals an evaluation text's or a
/// kept earlier text's is an exact duplicate (a leak when it is an evaluation text); then, among
/// the rest, one whose shingles have a Jaccard ≥ `near_threshold` with an evaluation text or a
/// kept earlier text (found through LSH bands, then verified exactly) is a near duplicate of the
/// most similar (a leak when any evaluation text passes). Evaluation texts are never dropped.
/// Sorted by record.
pub fn find_duplicates(train: &[&str], eval: &[&str], config: &DedupConfig) -> Result<Vec<Duplicate>> {
    config.validate()?;
    let train_keys: Vec<String> = train.iter().map(|t| dedup_key(t)).collect();
    let eval_keys: Vec<String> = eval.iter().map(|t| dedup_key(t)).collect();
    let mut out = Vec::new();
    let mut dropped = vec![false; train.len()];
    let mut exact: HashMap<&str, KeptRecord> = HashMap::new();
    for (i, k) in eval_keys.iter().enumerate() {
        exact.entry(k.as_str()).or_insert(KeptRecord::Eval(i));
    }
    for (i, k) in train_keys.iter().enumerate() {
        match exact.get(k.as_str()) {
            Some(&of) => {
                let reason = if matches!(of, KeptRecord::Eval(_)) { DropReason::EvalLeak } else { DropReason::Exact };
                out.push(Duplicate { record: i, reason, of, similarity: 1.0 });
                dropped[i] = true;
            }
            None => {
                exact.insert(k.as_str(), KeptRecord::Train(i));
            }
        }
    }
    // near duplicates among what is left
    let hasher = MinHasher::new(config.permutations, config.seed);
    let (bands, rows) = lsh_params(config.near_threshold, config.permutations);
    let mut buckets: HashMap<u64, Vec<KeptRecord>> = HashMap::new();
    let eval_shingles: Vec<Vec<u64>> = eval_keys.iter().map(|k| shingles(k, config.shingle_size)).collect();
    let mut train_shingles: Vec<Vec<u64>> = vec![Vec::new(); train.len()];
    for (i, s) in eval_shingles.iter().enumerate() {
        for key in band_keys(&hasher.signature(s), bands, rows) {
            buckets.entry(key).or_default().push(KeptRecord::Eval(i));
        }
    }
    for i in 0..train.len() {
        if dropped[i] {
            continue;
        }
        train_shingles[i] = shingles(&train_keys[i], config.shingle_size);
        let keys = band_keys(&hasher.signature(&train_shingles[i]), bands, rows);
        let mut candidates: Vec<KeptRecord> = keys.iter().filter_map(|k| buckets.get(k)).flatten().copied().collect();
        candidates.sort_by_key(|c| match c {
            KeptRecord::Eval(j) => (0, *j),
            KeptRecord::Train(j) => (1, *j),
        });
        candidates.dedup();
        let mut best: Option<(KeptRecord, f64)> = None;
        for c in candidates {
            let other = match c {
                KeptRecord::Eval(j) => &eval_shingles[j],
                KeptRecord::Train(j) => &train_shingles[j],
            };
            let s = jaccard(&train_shingles[i], other);
            if s < config.near_threshold {
                continue;
            }
            let better = match best {
                None => true,
                Some((KeptRecord::Eval(_), _)) if matches!(c, KeptRecord::Train(_)) => false,
                Some((KeptRecord::Train(_), _)) if matches!(c, KeptRecord::Eval(_)) => true,
                Some((_, b)) => s > b,
            };
            if better {
                best = Some((c, s));
            }
        }
        match best {
            Some((of, similarity)) => {
                let reason = if matches!(of, KeptRecord::Eval(_)) { DropReason::EvalLeak } else { DropReason::Near };
                out.push(Duplicate { record: i, reason, of, similarity });
                dropped[i] = true;
            }
            None => {
                for key in keys {
                    buckets.entry(key).or_default().push(KeptRecord::Train(i));
                }
            }
        }
    }
    out.sort_by_key(|d| d.record);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "高血压患者应当低盐饮食，每天食盐摄入量不超过五克，同时坚持规律运动，按时服用降压药物，定期监测血压并记录，如有头晕头痛等不适应及时就医复诊。";

    fn one_char_changed() -> String {
        BASE.replacen("五克", "六克", 1)
    }

    #[test]
    fn finds_planted_near_duplicates_and_leaks_but_not_unrelated_texts() {
        let changed = one_char_changed();
        let appended = format!("{BASE}祝您早日康复。");
        let unrelated = "糖尿病患者需要控制碳水化合物的摄入，监测空腹和餐后血糖，遵医嘱使用胰岛素或口服降糖药，并注意足部护理，预防感染和溃疡的发生。";
        let punctuated = BASE.replace('，', ",").replace('。', "!");
        let leak = "儿童发热超过三十八点五度时可以使用退烧药，例如布洛芬或对乙酰氨基酚，同时多喝水，注意观察精神状态，如果持续高热不退或者出现抽搐要马上去医院。";
        let leak_changed = leak.replacen("三十八", "三十九", 1);
        let train = [BASE, changed.as_str(), appended.as_str(), unrelated, punctuated.as_str(), leak_changed.as_str()];
        let d = find_duplicates(&train, &[leak], &DedupConfig::default()).unwrap();
        let summary: Vec<(usize, DropReason, KeptRecord)> = d.iter().map(|d| (d.record, d.reason, d.of)).collect();
        assert_eq!(
            summary,
            vec![
                (1, DropReason::Near, KeptRecord::Train(0)),
                (2, DropReason::Near, KeptRecord::Train(0)),
                (4, DropReason::Exact, KeptRecord::Train(0)),
                (5, DropReason::EvalLeak, KeptRecord::Eval(0)),
            ]
        );
        for x in &d {
            assert!(x.similarity >= 0.8 && x.similarity <= 1.0, "{x:?}");
        }
        assert_eq!(d[2].similarity, 1.0);
    }

    #[test]
    fn exact_leaks_and_english_text() {
        let train = ["Drink plenty of water.", "drink  plenty of WATER!", "Rest well."];
        let d = find_duplicates(&train, &["Rest well"], &DedupConfig::default()).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].record, d[0].reason, d[0].of), (1, DropReason::Exact, KeptRecord::Train(0)));
        assert_eq!((d[1].record, d[1].reason, d[1].of), (2, DropReason::EvalLeak, KeptRecord::Eval(0)));
        assert!(DedupConfig { near_threshold: 0.0, ..Default::default() }.validate().is_err());
    }
}
