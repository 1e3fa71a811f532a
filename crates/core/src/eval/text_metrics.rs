//! Reference-based answer scores: corpus BLEU-4, ROUGE-L F1, character F1, and SQuAD-style exact
//! match and token F1, as pure functions of strings (no model, no tensors).
//!
//! Tokens (BLEU and ROUGE-L): text is split on whitespace, and every CJK character (Han, kana,
//! CJK punctuation, full-width forms) is a token of its own, so Chinese text without spaces is
//! scored per character while English is scored per word; mixed text gets both. Tokens are
//! compared exactly (case and punctuation kept). BLEU is corpus-level (n-gram matches and
//! lengths summed over all samples, one reference each) with the brevity penalty and
//! sacrebleu's default "exp" smoothing: the k-th order with no match counts as 1 / (2^k · total)
//! instead of 0. ROUGE-L and character F1 are per-sample F1 scores averaged over the samples.
//!
//! Exact match and token F1 follow the official SQuAD script: both texts are normalised first
//! (lowercased, punctuation deleted, the English articles a / an / the dropped, whitespace
//! collapsed), then compared as token lists (EM) or bags of tokens (F1). Tokens are the same
//! CJK-aware `metric_tokens`, and CJK and full-width punctuation is deleted like ASCII
//! punctuation, so "多喝热水。" and "多喝 热水" match exactly. Both are per-sample means.
use std::collections::HashMap;

/// True for characters scored one per token: CJK ideographs, kana, CJK punctuation and
/// full-width forms.
pub fn is_cjk(c: char) -> bool {
    matches!(
        c as u32,
        0x3000..=0x303F      // CJK symbols and punctuation
            | 0x3040..=0x30FF // hiragana, katakana
            | 0x3400..=0x4DBF // CJK extension A
            | 0x4E00..=0x9FFF // CJK unified ideographs
            | 0xF900..=0xFAFF // CJK compatibility ideographs
            | 0xFF00..=0xFFEF // half- and full-width forms
            | 0x20000..=0x2FA1F // CJK extensions B–F, compatibility supplement
    )
}

/// The scoring tokens of `text`: whitespace-separated words, with each CJK character split off
/// as its own token.
pub fn metric_tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for word in text.split_whitespace() {
        let mut start = None;
        for (i, c) in word.char_indices() {
            if is_cjk(c) {
                if let Some(s) = start.take() {
                    out.push(&word[s..i]);
                }
                out.push(&word[i..i + c.len_utf8()]);
            } else if start.is_none() {
                start = Some(i);
            }
        }
        if let Some(s) = start {
            out.push(&word[s..]);
        }
    }
    out
}

fn ngram_counts<'t, 'a>(tokens: &'t [&'a str], n: usize) -> HashMap<&'t [&'a str], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for g in tokens.windows(n) {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    counts
}

/// The sufficient statistics of BLEU-4 for one or more samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BleuStats {
    /// Clipped n-gram matches, n = 1..4.
    pub matches: [u64; 4],
    /// Hypothesis n-grams, n = 1..4.
    pub totals: [u64; 4],
    pub hyp_len: u64,
    pub ref_len: u64,
}

impl BleuStats {
    pub fn add(&mut self, other: &BleuStats) {
        for n in 0..4 {
            self.matches[n] += other.matches[n];
            self.totals[n] += other.totals[n];
        }
        self.hyp_len += other.hyp_len;
        self.ref_len += other.ref_len;
    }
}

/// BLEU statistics of one hypothesis against one reference (both already tokenised).
pub fn bleu_stats(hyp: &[&str], reference: &[&str]) -> BleuStats {
    let mut s = BleuStats { hyp_len: hyp.len() as u64, ref_len: reference.len() as u64, ..Default::default() };
    for n in 1..=4 {
        let h = ngram_counts(hyp, n);
        let r = ngram_counts(reference, n);
        s.totals[n - 1] = hyp.len().saturating_sub(n - 1) as u64;
        s.matches[n - 1] = h.iter().map(|(g, &c)| c.min(r.get(g).copied().unwrap_or(0)) as u64).sum();
    }
    s
}

/// A BLEU-4 score in [0, 1] with its parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bleu {
    pub score: f64,
    /// Smoothed n-gram precisions, n = 1..4.
    pub precisions: [f64; 4],
    pub brevity_penalty: f64,
}

/// BLEU-4 from summed statistics: brevity penalty · geometric mean of the four precisions, with
/// "exp" smoothing (the k-th order without matches gets 1 / (2^k · total)). An order with no
/// hypothesis n-grams at all (every hypothesis shorter than n) makes the score 0, as in sacrebleu.
pub fn bleu_from_stats(s: &BleuStats) -> Bleu {
    let brevity_penalty = if s.hyp_len >= s.ref_len {
        1.0
    } else if s.hyp_len == 0 {
        0.0
    } else {
        (1.0 - s.ref_len as f64 / s.hyp_len as f64).exp()
    };
    let mut precisions = [0.0; 4];
    let mut smooth = 1.0;
    for (p, (&matches, &total)) in precisions.iter_mut().zip(s.matches.iter().zip(&s.totals)) {
        if total == 0 {
            break;
        }
        *p = if matches == 0 {
            smooth *= 2.0;
            1.0 / (smooth * total as f64)
        } else {
            matches as f64 / total as f64
        };
    }
    let score = if precisions.iter().any(|&p| p <= 0.0) {
        0.0
    } else {
        brevity_penalty * (precisions.iter().map(|p| p.ln()).sum::<f64>() / 4.0).exp()
    };
    Bleu { score, precisions, brevity_penalty }
}

/// Corpus BLEU-4 of `(hypothesis, reference)` pairs.
pub fn corpus_bleu<S: AsRef<str>>(pairs: &[(S, S)]) -> Bleu {
    let mut total = BleuStats::default();
    for (h, r) in pairs {
        total.add(&bleu_stats(&metric_tokens(h.as_ref()), &metric_tokens(r.as_ref())));
    }
    bleu_from_stats(&total)
}

/// Length of the longest common subsequence of two token lists.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// F1 of an overlap count between a hypothesis of `hyp_len` and a reference of `ref_len` items:
/// 1 when both are empty, 0 when only one is or nothing overlaps.
pub fn overlap_f1(overlap: usize, hyp_len: usize, ref_len: usize) -> f64 {
    if hyp_len == 0 && ref_len == 0 {
        return 1.0;
    }
    if overlap == 0 {
        return 0.0;
    }
    let p = overlap as f64 / hyp_len as f64;
    let r = overlap as f64 / ref_len as f64;
    2.0 * p * r / (p + r)
}

/// ROUGE-L F1 of one hypothesis against one reference: LCS of the scoring tokens, precision
/// LCS / |hyp|, recall LCS / |ref|.
pub fn rouge_l(hyp: &str, reference: &str) -> f64 {
    let h = metric_tokens(hyp);
    let r = metric_tokens(reference);
    overlap_f1(lcs_len(&h, &r), h.len(), r.len())
}

/// Character F1: the two texts as bags (multisets) of characters with whitespace removed; the
/// overlap is the sum over characters of the smaller count.
pub fn char_f1(hyp: &str, reference: &str) -> f64 {
    let bag = |s: &str| {
        let mut m: HashMap<char, usize> = HashMap::new();
        for c in s.chars().filter(|c| !c.is_whitespace()) {
            *m.entry(c).or_insert(0) += 1;
        }
        m
    };
    let h = bag(hyp);
    let r = bag(reference);
    let overlap: usize = h.iter().map(|(c, &n)| n.min(r.get(c).copied().unwrap_or(0))).sum();
    overlap_f1(overlap, h.values().sum(), r.values().sum())
}

/// True for punctuation that SQuAD-style normalisation deletes: ASCII punctuation, Latin-1
/// punctuation (¡ « · » ¿), general punctuation (‘ ’ “ ” – — … ‧), CJK symbols and punctuation
/// (、 。 「 」 《 》 …), CJK compatibility and small forms, and full-width punctuation
/// (！ ， ： ； ？ （ ）…).
pub fn is_answer_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            c as u32,
            0xA1 | 0xA7 | 0xAB | 0xB6 | 0xB7 | 0xBB | 0xBF
                | 0x2010..=0x2027 // dashes, quotes, bullets, ellipsis
                | 0x2030..=0x205E // per mille, primes, guillemets, …
                | 0x3001..=0x3003 // 、 。 〃
                | 0x3008..=0x3011 // 〈 〉 《 》 「 」 『 』 【 】
                | 0x3014..=0x301F // 〔 〕 〖 〗 〘 〙 〚 〛 〜 〝 〞 〟
                | 0x3030 | 0x303D | 0x30FB // 〰 〽 ・
                | 0xFE10..=0xFE19 // vertical forms
                | 0xFE30..=0xFE6B // CJK compatibility and small forms
                | 0xFF01..=0xFF0F // ！ ＂ ＃ … ／
                | 0xFF1A..=0xFF20 // ： ； ＜ ＝ ＞ ？ ＠
                | 0xFF3B..=0xFF40 // ［ ＼ ］ ＾ ＿ ｀
                | 0xFF5B..=0xFF65 // ｛ ｜ ｝ ～ ｟ ｠ ｡ ｢ ｣ ､ ･
        )
}

/// SQuAD's `normalize_answer`, CJK-aware: lowercase, delete punctuation (`is_answer_punctuation`),
/// drop the words a / an / the, collapse whitespace (the ideographic space included) to single
/// spaces. "The Cat!" → "cat"; "多喝热水。" → "多喝热水".
pub fn normalize_answer(text: &str) -> String {
    let kept: String = text.to_lowercase().chars().filter(|&c| !is_answer_punctuation(c)).collect();
    kept.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

/// The tokens exact match and token F1 compare: `metric_tokens` of the normalised text.
pub fn answer_tokens(text: &str) -> Vec<String> {
    metric_tokens(&normalize_answer(text)).into_iter().map(str::to_string).collect()
}

/// Exact match after normalisation (1 or 0). Compared as token lists, so spaces between CJK
/// characters do not matter.
pub fn exact_match(hyp: &str, reference: &str) -> f64 {
    if answer_tokens(hyp) == answer_tokens(reference) {
        1.0
    } else {
        0.0
    }
}

/// SQuAD token F1: the normalised tokens as bags; the overlap is the sum over tokens of the
/// smaller count (1 when both are empty, 0 when only one is).
pub fn token_f1(hyp: &str, reference: &str) -> f64 {
    let h = answer_tokens(hyp);
    let r = answer_tokens(reference);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &r {
        *counts.entry(t.as_str()).or_insert(0) += 1;
    }
    let mut overlap = 0;
    for t in &h {
        if let Some(n) = counts.get_mut(t.as_str()).filter(|n| **n > 0) {
            *n -= 1;
            overlap += 1;
        }
    }
    overlap_f1(overlap, h.len(), r.len())
}

/// The answer scores of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerScores {
    /// Corpus BLEU-4 in [0, 1].
    pub bleu4: f64,
    /// Mean ROUGE-L F1.
    pub rouge_l: f64,
    /// Mean character F1.
    pub char_f1: f64,
    /// Mean SQuAD-style exact match (share of answers equal to their reference after
    /// normalisation).
    pub exact_match: f64,
    /// Mean SQuAD-style token F1.
    pub f1: f64,
    pub samples: usize,
}

/// Scores `(answer, reference)` pairs (0 for every score when there are none).
pub fn score_answers<S: AsRef<str>>(pairs: &[(S, S)]) -> AnswerScores {
    let n = pairs.len();
    if n == 0 {
        return AnswerScores { bleu4: 0.0, rouge_l: 0.0, char_f1: 0.0, exact_match: 0.0, f1: 0.0, samples: 0 };
    }
    let mean = |f: fn(&str, &str) -> f64| pairs.iter().map(|(h, r)| f(h.as_ref(), r.as_ref())).sum::<f64>() / n as f64;
    AnswerScores {
        bleu4: corpus_bleu(pairs).score,
        rouge_l: mean(rouge_l),
        char_f1: mean(char_f1),
        exact_match: mean(exact_match),
        f1: mean(token_f1),
        samples: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn tokens_are_words_and_single_cjk_characters() {
        assert_eq!(metric_tokens("  the cat\tsat. "), vec!["the", "cat", "sat."]);
        assert_eq!(metric_tokens("失眠。"), vec!["失", "眠", "。"]);
        assert_eq!(metric_tokens("用药 aspirin100mg每天"), vec!["用", "药", "aspirin100mg", "每", "天"]);
        assert!(metric_tokens(" \n").is_empty());
    }

    #[test]
    fn identical_text_scores_one() {
        let pairs = [("the cat sat on the mat", "the cat sat on the mat")];
        let s = score_answers(&pairs);
        assert!(close(s.bleu4, 1.0) && close(s.rouge_l, 1.0) && close(s.char_f1, 1.0), "{s:?}");
    }

    #[test]
    fn bleu_by_hand_with_brevity_penalty() {
        // hyp "the cat sat on the mat" (6) vs ref "the cat sat on a red mat" (7)
        // 1-grams: the×2 (ref the×1 → 1), cat, sat, on, mat → 5/6
        // 2-grams: the cat, cat sat, sat on ✓; on the, the mat ✗ → 3/5
        // 3-grams: the cat sat, cat sat on ✓ → 2/4;  4-grams: the cat sat on ✓ → 1/3
        // BP = exp(1 - 7/6)
        let b = corpus_bleu(&[("the cat sat on the mat", "the cat sat on a red mat")]);
        let expected = (1.0f64 - 7.0 / 6.0).exp() * (5.0f64 / 6.0 * 0.6 * 0.5 / 3.0).powf(0.25);
        assert!(close(b.brevity_penalty, (1.0f64 - 7.0 / 6.0).exp()));
        assert!(close(b.precisions[0], 5.0 / 6.0) && close(b.precisions[3], 1.0 / 3.0), "{b:?}");
        // = 0.846482… · (5/6 · 3/5 · 1/2 · 1/3)^(1/4) = 0.846482 · 0.537285 = 0.454802 (sacrebleu
        // with tokenize='none' gives the same 45.4802)
        assert!(close(b.score, expected), "{b:?}");
        assert!((b.score - 0.454802).abs() < 1e-6, "{b:?}");
    }

    #[test]
    fn bleu_is_corpus_level_and_smooths_missing_orders() {
        // no 3- or 4-gram matches: hyp "a b x c" vs ref "a b y c"
        // 1-grams 3/4, 2-grams 1/3 (a b), 3-grams 0/2 → 1/(2·2), 4-grams 0/1 → 1/(4·1)
        let b = corpus_bleu(&[("a b x c", "a b y c")]);
        assert!(close(b.precisions[2], 0.25) && close(b.precisions[3], 0.25), "{b:?}");
        assert!(close(b.score, (0.75f64 * (1.0 / 3.0) * 0.25 * 0.25).powf(0.25)), "{b:?}");
        // corpus statistics are sums, not a mean of sentence scores
        let pairs = [("a b c d", "a b c d"), ("x", "y z")];
        let b = corpus_bleu(&pairs);
        // matches 4/5, 3/3, 2/2, 1/1; hyp 5 < ref 6 → BP = exp(1 - 6/5)
        assert!(close(b.score, (1.0f64 - 6.0 / 5.0).exp() * 0.8f64.powf(0.25)), "{b:?}");
        // an order no hypothesis reaches scores 0
        assert_eq!(corpus_bleu(&[("a b", "a b")]).score, 0.0);
    }

    #[test]
    fn chinese_bleu_counts_characters() {
        // 4 characters + 。 each a token: identical → 1
        assert!(close(corpus_bleu(&[("多喝热水。", "多喝热水。")]).score, 1.0));
        // hyp 多喝水 vs ref 多喝热水: 1-grams 3/3, 2-grams 1/2 (多喝), 3-grams 0/1 → 1/2,
        // 4-grams: none → score 0; ROUGE-L: LCS 3, P 1, R 3/4 → 6/7
        assert_eq!(corpus_bleu(&[("多喝水", "多喝热水")]).score, 0.0);
        assert!(close(rouge_l("多喝水", "多喝热水"), 6.0 / 7.0));
    }

    #[test]
    fn rouge_l_by_hand() {
        // LCS("the cat sat on the mat", "the cat was on a mat") = the cat on mat = 4
        // P = 4/6, R = 4/6 → F1 = 2/3
        assert!(close(rouge_l("the cat sat on the mat", "the cat was on a mat"), 2.0 / 3.0));
        assert_eq!(lcs_len(&["a", "b", "c", "d"], &["b", "d", "a"]), 2);
        assert_eq!(rouge_l("", "x"), 0.0);
        assert_eq!(rouge_l("", ""), 1.0);
    }

    #[test]
    fn char_f1_by_hand() {
        // "发烧了" vs "发烧" : overlap 2, P 2/3, R 1 → 0.8
        assert!(close(char_f1("发烧了", "发烧"), 0.8));
        // whitespace is ignored; counts are clipped: "aab" vs "a b" → overlap a1 + b1 = 2, P 2/3, R 1
        assert!(close(char_f1("aab", "a b"), 0.8));
        assert_eq!(char_f1("xyz", "abc"), 0.0);
    }

    #[test]
    fn squad_normalisation_as_the_official_script() {
        // the official script: lower → remove punctuation → remove articles → fix whitespace
        assert_eq!(normalize_answer("The Cat!"), "cat");
        assert_eq!(normalize_answer("  A  man, a plan;  the   canal: Panama. "), "man plan canal panama");
        // punctuation is deleted, not replaced by a space; articles only as whole words
        assert_eq!(normalize_answer("don't"), "dont");
        assert_eq!(normalize_answer("Theater an Anne"), "theater anne");
        // Chinese and full-width punctuation, the ideographic space
        assert_eq!(normalize_answer("“多喝热水。”\u{3000}（休息）！"), "多喝热水 休息");
        assert_eq!(answer_tokens("发烧，吃药"), vec!["发", "烧", "吃", "药"]);
    }

    #[test]
    fn exact_match_by_hand() {
        assert_eq!(exact_match("The Cat!", "cat"), 1.0);
        assert_eq!(exact_match("Denver Broncos", "the denver broncos."), 1.0);
        assert_eq!(exact_match("Broncos", "Denver Broncos"), 0.0);
        // CJK: per-character tokens, spaces and punctuation do not matter
        assert_eq!(exact_match("多喝 热水", "多喝热水。"), 1.0);
        assert_eq!(exact_match("多喝水", "多喝热水"), 0.0);
        assert_eq!(exact_match("", "!"), 1.0);
    }

    #[test]
    fn token_f1_by_hand() {
        // "the cat sat" → [cat, sat]; "a cat sat on the mat" → [cat, sat, on, mat]:
        // overlap 2, P 1, R 1/2 → 2/3
        assert!(close(token_f1("the cat sat", "a cat sat on the mat"), 2.0 / 3.0));
        // counts are clipped: [cat, cat, dog] vs [cat, dog, dog] → overlap 2, P = R = 2/3
        assert!(close(token_f1("cat cat dog", "cat dog dog"), 2.0 / 3.0));
        // SQuAD: "Denver Broncos" vs "Broncos" → overlap 1, P 1/2, R 1 → 2/3
        assert!(close(token_f1("Denver Broncos", "Broncos"), 2.0 / 3.0));
        // CJK per character: 多喝水 vs 多喝热水。 → overlap 3, P 1, R 3/4 → 6/7
        assert!(close(token_f1("多喝水", "多喝热水。"), 6.0 / 7.0));
        // an answer that normalises to nothing matches only an empty reference
        assert_eq!(token_f1("The!", "cat"), 0.0);
        assert_eq!(token_f1("the", "a"), 1.0);
    }

    #[test]
    fn scores_average_rouge_and_char_f1_over_samples() {
        let s = score_answers(&[("发烧了", "发烧"), ("abc", "abc")]);
        assert!(close(s.char_f1, 0.9) && s.samples == 2, "{s:?}");
        // EM: 0 and 1; F1: 发烧了 vs 发烧 → overlap 2, P 2/3, R 1 → 0.8, and 1
        assert!(close(s.exact_match, 0.5) && close(s.f1, 0.9), "{s:?}");
        assert_eq!(score_answers::<&str>(&[]).samples, 0);
    }
}
