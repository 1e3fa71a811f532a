//! Text normalisation for duplicate detection: full-width forms folded to ASCII, lowercase,
//! punctuation and symbols removed, whitespace collapsed. Letters and digits of every script
//! (Chinese characters included) are kept.

/// Folds a full-width ASCII form (U+FF01–U+FF5E) and the ideographic space to ASCII.
pub fn fold_width(c: char) -> char {
    match c {
        '\u{3000}' => ' ',
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        _ => c,
    }
}

/// The key two records are compared by: `fold_width`, lowercase, every character that is not a
/// letter, a digit or whitespace removed (ASCII and CJK punctuation, symbols, emoji), runs of
/// whitespace made one space, both ends trimmed.
pub fn dedup_key(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars().map(fold_width) {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if !c.is_alphanumeric() {
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.extend(c.to_lowercase());
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
        assert_eq!(dedup_key("发烧 怎么办?"), "发烧 怎么办");
        assert_eq!(dedup_key("Größe: 38,5 °C"), "größe 385 c");
        assert_eq!(dedup_key("!!!"), "");
    }
}
