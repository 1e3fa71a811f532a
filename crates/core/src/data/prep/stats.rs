//! Statistics of data files (`align data stats`): records, character and token lengths with a
//! token-length histogram, turns per record and detected languages, per file and in total.
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::lang::detect_language;
use super::PrepFile;
use crate::data::LengthStats;

/// Upper bounds of the token-length histogram's buckets (the last bucket is everything longer).
pub const TOKEN_BUCKETS: [usize; 7] = [64, 128, 256, 512, 1024, 2048, 4096];

/// One bucket of a histogram: lengths in `from..=to` (`to` none: and longer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub from: usize,
    pub to: Option<usize>,
    pub count: usize,
}

impl Bucket {
    pub fn label(&self) -> String {
        match self.to {
            Some(to) => format!("{}-{to}", self.from),
            None => format!(">{}", self.from.saturating_sub(1)),
        }
    }
}

/// Counts `lengths` into buckets bounded above by `bounds` (inclusive), plus one bucket for the
/// longer ones.
pub fn histogram(lengths: &[usize], bounds: &[usize]) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::with_capacity(bounds.len() + 1);
    let mut from = 0;
    for &b in bounds {
        buckets.push(Bucket { from, to: Some(b), count: 0 });
        from = b + 1;
    }
    buckets.push(Bucket { from, to: None, count: 0 });
    for &l in lengths {
        let i = bounds.iter().position(|&b| l <= b).unwrap_or(bounds.len());
        buckets[i].count += 1;
    }
    buckets
}

/// The statistics of one file (or of all files, `path` = `total`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataStats {
    pub path: String,
    pub format: Option<String>,
    pub records: usize,
    /// Characters of each record's text content.
    pub chars: Option<LengthStats>,
    /// Tokens as the stage sees them (with a tokenizer).
    pub tokens: Option<LengthStats>,
    pub token_histogram: Option<Vec<Bucket>>,
    /// Records by their number of user + assistant messages (none for pretraining text).
    pub turns: BTreeMap<usize, usize>,
    /// Records by detected language (`lang::detect_language`).
    pub languages: BTreeMap<String, usize>,
}

/// Statistics of records from files given by name.
fn stats_of<'a>(
    path: String,
    format: Option<String>,
    records: impl Iterator<Item = &'a super::PrepRecord>,
) -> DataStats {
    let (mut chars, mut tokens) = (Vec::new(), Vec::new());
    let mut turns = BTreeMap::new();
    let mut languages = BTreeMap::new();
    let mut n = 0;
    for r in records {
        n += 1;
        chars.push(r.text.chars().count());
        if let Some(t) = r.tokens {
            tokens.push(t);
        }
        if r.turns > 0 {
            *turns.entry(r.turns).or_insert(0) += 1;
        }
        *languages.entry(detect_language(&r.text).language.to_string()).or_insert(0) += 1;
    }
    let has_tokens = !tokens.is_empty();
    DataStats {
        path,
        format,
        records: n,
        chars: LengthStats::from_lengths(&chars, None),
        tokens: LengthStats::from_lengths(&tokens, None),
        token_histogram: has_tokens.then(|| histogram(&tokens, &TOKEN_BUCKETS)),
        turns,
        languages,
    }
}

/// Per-file statistics, then the total over all files.
pub fn data_stats(files: &[PrepFile]) -> (Vec<DataStats>, DataStats) {
    let per_file = files
        .iter()
        .map(|f| stats_of(f.path.display().to_string(), f.format.map(|x| x.name().to_string()), f.records.iter()))
        .collect();
    let total = stats_of(format!("total ({} files)", files.len()), None, files.iter().flat_map(|f| f.records.iter()));
    (per_file, total)
}

fn counts(map: &BTreeMap<impl std::fmt::Display, usize>) -> String {
    if map.is_empty() {
        return "-".to_string();
    }
    map.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")
}

/// The statistics as a table: one row per file and the total, then the total's token histogram.
pub fn stats_table(files: &[DataStats], total: &DataStats) -> String {
    let with_tokens = total.tokens.is_some();
    let mut header = vec!["file", "format", "records", "p50 chr", "max chr"];
    if with_tokens {
        header.extend(["p50 tok", "p95 tok", "max tok"]);
    }
    header.extend(["turns", "languages"]);
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in files.iter().chain([total]) {
        let mut row = vec![
            s.path.clone(),
            s.format.clone().unwrap_or_default(),
            s.records.to_string(),
            s.chars.map_or("-".into(), |c| c.p50.to_string()),
            s.chars.map_or("-".into(), |c| c.max.to_string()),
        ];
        if with_tokens {
            let t = s.tokens;
            row.extend([
                t.map_or("-".into(), |t| t.p50.to_string()),
                t.map_or("-".into(), |t| t.p95.to_string()),
                t.map_or("-".into(), |t| t.max.to_string()),
            ]);
        }
        row.extend([counts(&s.turns), counts(&s.languages)]);
        rows.push(row);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i].saturating_sub(c.chars().count());
                if i >= 2 && i < header.len() - 2 {
                    format!("{}{c}", " ".repeat(pad))
                } else {
                    format!("{c}{}", " ".repeat(pad))
                }
            })
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>(), &mut out);
    line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(), &mut out);
    for r in &rows {
        line(r, &mut out);
    }
    if let Some(h) = &total.token_histogram {
        let _ = writeln!(out, "\ntoken lengths (all files):");
        let most = h.iter().map(|b| b.count).max().unwrap_or(0).max(1);
        for b in h {
            let bar = "#".repeat((b.count * 40).div_ceil(most));
            let _ = writeln!(out, "  {:>11}  {:>7}  {bar}", b.label(), b.count);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_above() {
        let h = histogram(&[0, 64, 65, 128, 5000], &[64, 128]);
        let got: Vec<(String, usize)> = h.iter().map(|b| (b.label(), b.count)).collect();
        assert_eq!(got, vec![("0-64".to_string(), 2), ("65-128".to_string(), 2), (">128".to_string(), 1)]);
    }
}
