//! A script-based language detector: counts the letters of each script (Han, kana, Hangul,
//! Latin, Cyrillic, Arabic, Devanagari, Greek, Thai) and names the language of the script that
//! dominates. It tells Chinese from English reliably; it cannot tell languages that share a
//! script apart (all Latin-script text is `en`, all Cyrillic `ru`).
use serde::Serialize;

/// The scripts the detector counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Script {
    Han,
    Kana,
    Hangul,
    Latin,
    Cyrillic,
    Arabic,
    Devanagari,
    Greek,
    Thai,
}

impl Script {
    /// The script of a letter (`None` for digits, punctuation, spaces and other scripts).
    pub fn of(c: char) -> Option<Script> {
        let u = c as u32;
        let script = match u {
            0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0xF900..=0xFAFF | 0x3007 => Script::Han,
            0x3040..=0x309F | 0x30A0..=0x30FF | 0x31F0..=0x31FF | 0xFF66..=0xFF9D => Script::Kana,
            0xAC00..=0xD7AF | 0x1100..=0x11FF | 0x3130..=0x318F => Script::Hangul,
            0x0400..=0x04FF | 0x0500..=0x052F => Script::Cyrillic,
            0x0600..=0x06FF | 0x0750..=0x077F => Script::Arabic,
            0x0900..=0x097F => Script::Devanagari,
            0x0370..=0x03FF => Script::Greek,
            0x0E00..=0x0E7F => Script::Thai,
            _ if c.is_alphabetic() && (c.is_ascii_alphabetic() || (0x00C0..=0x024F).contains(&u)) => Script::Latin,
            _ if (0xFF21..=0xFF3A).contains(&u) || (0xFF41..=0xFF5A).contains(&u) => Script::Latin,
            _ => return None,
        };
        Some(script)
    }

    /// The language code a text dominated by this script is given.
    pub fn language(self) -> &'static str {
        match self {
            Script::Han => "zh",
            Script::Kana => "ja",
            Script::Hangul => "ko",
            Script::Latin => "en",
            Script::Cyrillic => "ru",
            Script::Arabic => "ar",
            Script::Devanagari => "hi",
            Script::Greek => "el",
            Script::Thai => "th",
        }
    }
}

/// The language codes the detector gives (besides `unknown`).
pub const LANGUAGES: [&str; 9] = ["zh", "ja", "ko", "en", "ru", "ar", "hi", "el", "th"];

/// The detected language of a text and the share of its letters in that language's script.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Detected {
    /// `zh`, `ja`, `ko`, `en`, `ru`, `ar`, `hi`, `el`, `th`, or `unknown` (no letters).
    pub language: &'static str,
    pub share: f64,
}

/// Detects the language of `text` from its letters. A Chinese character counts as much as a
/// Latin letter, so Chinese text with English terms (`CT`, `MRI`) stays `zh` while the Chinese
/// characters are the most letters. Japanese mixes Han and kana: kana that are at least 10% of
/// the letters make the text `ja`.
pub fn detect_language(text: &str) -> Detected {
    let mut counts = [0usize; 9];
    let mut total = 0usize;
    for c in text.chars() {
        if let Some(s) = Script::of(c) {
            counts[s as usize] += 1;
            total += 1;
        }
    }
    if total == 0 {
        return Detected { language: "unknown", share: 0.0 };
    }
    let kana = counts[Script::Kana as usize];
    let han = counts[Script::Han as usize];
    let (script, count) = if kana * 10 >= total && kana + han >= total / 2 {
        (Script::Kana, kana + han)
    } else {
        let all = [
            Script::Han,
            Script::Kana,
            Script::Hangul,
            Script::Latin,
            Script::Cyrillic,
            Script::Arabic,
            Script::Devanagari,
            Script::Greek,
            Script::Thai,
        ];
        let best = all.into_iter().max_by_key(|s| (counts[*s as usize], std::cmp::Reverse(*s as usize)));
        let s = best.unwrap_or(Script::Latin);
        (s, counts[s as usize])
    };
    Detected { language: script.language(), share: count as f64 / total as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_chinese_english_and_others_apart() {
        assert_eq!(detect_language("高血压患者应低盐饮食。").language, "zh");
        assert_eq!(detect_language("患者做了CT和MRI检查，结果正常。").language, "zh");
        assert_eq!(detect_language("Drink water and rest; see a doctor if the fever lasts.").language, "en");
        assert_eq!(detect_language("Пейте больше воды.").language, "ru");
        assert_eq!(detect_language("水をたくさん飲んでください。").language, "ja");
        assert_eq!(detect_language("물을 많이 드세요").language, "ko");
        assert_eq!(detect_language("12345 !!!").language, "unknown");
        let d = detect_language("发烧 fever");
        assert_eq!(d.language, "en");
        assert!((d.share - 5.0 / 7.0).abs() < 1e-12);
    }
}
