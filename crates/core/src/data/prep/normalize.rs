//! Text normalisation for duplicate detection: full-width forms folded to ASCII, lowercase,
//! punctuation, symbols and whitespace reduced to single spaces between words (none next to
//! CJK characters). Letters and digits of every script (Chinese characters included) are kept.
use super::lang::Script;

/// Folds a full-width ASCII form (U+FF01–U+FF5E) and the ideographic space to ASCII.
pub fn fold_width(c: char) -> char {
    match c {
        '\u{3000}' => ' ',
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        _ => c,
    }
}

/// Chinese, Japanese and Korean characters: no spaces are needed between them.
fn is_cjk(c: char) -> bool {
    matches!(Script::of(c), Some(Script::Han | Script::Kana | Script::Hangul))
}

/// The key two records are compared by: `fold_width`, lowercase, every character that is not a
/// letter or a digit (ASCII and CJK punctuation, symbols, emoji, whitespace) a separator; runs
/// of separators become one space between two non-CJK characters and nothing next to a CJK
/// character (`摄入, 监测` and `摄入，监测` are both `摄入监测`); both ends trimmed.
pub fn dedup_key(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last: Option<char> = None;
    let mut separated = false;
    for c in text.chars().map(fold_width) {
        if !c.is_alphanumeric() {
            separated = last.is_some();
            continue;
        }
        if separated {
            if let Some(prev) = last {
                if !is_cjk(prev) && !is_cjk(c) {
                    out.push(' ');
                }
            }
            separated = false;
        }
        for l in c.to_lowercase() {
            out.push(l);
        }
        last = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_case_width_punctuation_and_spacing() {
        assert_eq!(dedup_key("  Hello,   World!\n"), "hello world");
        assert_eq!(dedup_key("ＨＥＬＬＯ　world."), "hello world");
        assert_eq!(dedup_key("发烧怎么办？多喝水，注意休息。"), "发烧怎么办多喝水注意休息");
        assert_eq!(dedup_key("发烧 怎么办?"), "发烧怎么办");
        assert_eq!(dedup_key("摄入, 监测 CT 检查"), dedup_key("摄入，监测CT检查"));
        assert_eq!(dedup_key("hello,world"), "hello world");
        assert_eq!(dedup_key("Größe: 38,5 °C"), "größe 38 5 c");
        assert_eq!(dedup_key("!!!"), "");
    }
}
