//! Cleaning record text: HTML remnants (tags, comments, entities such as `&nbsp;` `&amp;`),
//! control and zero-width characters, whitespace; and dropping records outside length limits or
//! not in the wanted languages, each change and drop reported with its file:line.
use std::sync::OnceLock;

use anyhow::{bail, Result};
use regex::Regex;
use serde::Serialize;
use serde_json::Value;

use super::lang::{detect_language, LANGUAGES};
use super::{content_of, PrepFile};
use crate::data::{DataKind, Origin};

/// What cleaning changed in a text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub html_tags: usize,
    pub entities: usize,
    pub control_chars: usize,
    pub whitespace: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.html_tags > 0 || self.entities > 0 || self.control_chars > 0 || self.whitespace
    }

    fn add(&mut self, other: Changes) {
        self.html_tags += other.html_tags;
        self.entities += other.entities;
        self.control_chars += other.control_chars;
        self.whitespace |= other.whitespace;
    }

    /// One phrase per kind of change (`2 HTML tags removed`, …).
    pub fn describe(&self) -> Vec<String> {
        let plural = |n: usize, one: &str, many: &str| if n == 1 { format!("1 {one}") } else { format!("{n} {many}") };
        let mut out = Vec::new();
        if self.html_tags > 0 {
            out.push(format!("{} removed", plural(self.html_tags, "HTML tag", "HTML tags")));
        }
        if self.entities > 0 {
            out.push(format!("{} decoded", plural(self.entities, "HTML entity", "HTML entities")));
        }
        if self.control_chars > 0 {
            out.push(format!("{} removed", plural(self.control_chars, "control character", "control characters")));
        }
        if self.whitespace {
            out.push("whitespace normalised".to_string());
        }
        out
    }
}

/// HTML elements whose tags are removed (a `<` followed by anything else is text, e.g. `<140`).
const TAGS: &str = "a|abbr|article|aside|b|big|blockquote|body|br|button|caption|center|cite|code|col|colgroup|dd|del|div|dl|dt|em|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|ins|kbd|label|li|link|main|mark|meta|nav|nobr|ol|option|p|pre|q|s|samp|script|section|select|small|span|strike|strong|style|sub|sup|table|tbody|td|tfoot|th|thead|title|tr|tt|u|ul|var|wbr";
/// Elements whose tags end a line.
const BLOCK_TAGS: [&str; 20] = [
    "br",
    "p",
    "div",
    "li",
    "tr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "table",
    "blockquote",
    "pre",
    "hr",
    "section",
    "article",
    "dd",
];

fn tag_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(&format!(r"(?is)<!--.*?-->|</?({TAGS})(\s[^<>\n]*)?/?>")).expect("the tag pattern is valid")
    })
}

fn entity_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});").expect("valid"))
}

fn named_entity(name: &str) -> Option<&'static str> {
    Some(match name {
        "nbsp" | "ensp" | "emsp" | "thinsp" => " ",
        "amp" => "&",
        "lt" => "<",
        "gt" => ">",
        "quot" => "\"",
        "apos" => "'",
        "mdash" => "—",
        "ndash" => "–",
        "hellip" => "…",
        "middot" => "·",
        "times" => "×",
        "divide" => "÷",
        "deg" => "°",
        "plusmn" => "±",
        "micro" => "µ",
        "copy" => "©",
        "reg" => "®",
        "trade" => "™",
        "yen" => "¥",
        "euro" => "€",
        "pound" => "£",
        "laquo" => "«",
        "raquo" => "»",
        "ldquo" => "“",
        "rdquo" => "”",
        "lsquo" => "‘",
        "rsquo" => "’",
        "le" => "≤",
        "ge" => "≥",
        _ => return None,
    })
}

/// Removes HTML tags and comments (block tags such as `<br>` and `</p>` become a line break).
fn strip_tags(text: &str, changes: &mut Changes) -> String {
    if !text.contains('<') {
        return text.to_string();
    }
    tag_pattern()
        .replace_all(text, |caps: &regex::Captures| {
            changes.html_tags += 1;
            match caps.get(1) {
                Some(name) if BLOCK_TAGS.contains(&name.as_str().to_ascii_lowercase().as_str()) => "\n",
                _ => "",
            }
        })
        .into_owned()
}

/// Decodes HTML entities (`&nbsp;`, `&amp;`, `&#39;`, `&#x4e2d;`, …); unknown names stay as written.
fn decode_entities(text: &str, changes: &mut Changes) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    entity_pattern()
        .replace_all(text, |caps: &regex::Captures| {
            let body = &caps[1];
            let decoded = if let Some(num) = body.strip_prefix("#x").or_else(|| body.strip_prefix("#X")) {
                u32::from_str_radix(num, 16).ok().and_then(char::from_u32).map(String::from)
            } else if let Some(num) = body.strip_prefix('#') {
                num.parse::<u32>().ok().and_then(char::from_u32).map(String::from)
            } else {
                named_entity(body).map(String::from)
            };
            match decoded {
                Some(d) => {
                    changes.entities += 1;
                    d
                }
                None => caps[0].to_string(),
            }
        })
        .into_owned()
}

/// Control characters (other than line breaks and tabs) and zero-width / soft-hyphen characters.
fn is_removed_char(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t' && c != '\r')
        || matches!(c, '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}')
}

/// Whitespace: `\r\n` and `\r` become `\n`; every other space character (tab, no-break space,
/// ideographic space, …) a plain space; runs of spaces one space; spaces at line ends removed; at
/// most one empty line in a row; both ends trimmed.
fn normalise_whitespace(text: &str) -> String {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut lines: Vec<String> = Vec::new();
    for line in text.split('\n') {
        let mut out = String::with_capacity(line.len());
        let mut space = false;
        for c in line.chars() {
            if c.is_whitespace() {
                space = true;
            } else {
                if space && !out.is_empty() {
                    out.push(' ');
                }
                space = false;
                out.push(c);
            }
        }
        lines.push(out);
    }
    let mut joined = String::with_capacity(text.len());
    let mut empty_run = 0;
    for line in lines {
        if line.is_empty() {
            empty_run += 1;
            if empty_run > 1 {
                continue;
            }
        } else {
            empty_run = 0;
        }
        joined.push_str(&line);
        joined.push('\n');
    }
    joined.trim().to_string()
}

/// Cleans one text: HTML tags, then entities, then control characters, then whitespace.
pub fn clean_text(text: &str) -> (String, Changes) {
    let mut changes = Changes::default();
    let t = strip_tags(text, &mut changes);
    let t = decode_entities(&t, &mut changes);
    let before = t.chars().count();
    let t: String = t.chars().filter(|&c| !is_removed_char(c)).collect();
    changes.control_chars = before - t.chars().count();
    let w = normalise_whitespace(&t);
    changes.whitespace = w != t;
    (w, changes)
}

/// Cleans every string of a JSON value in place (object keys are left alone).
pub fn clean_value(value: &mut Value) -> Changes {
    let mut changes = Changes::default();
    match value {
        Value::String(s) => {
            let (cleaned, c) = clean_text(s);
            if c.any() {
                *s = cleaned;
            }
            changes.add(c);
        }
        Value::Array(items) => items.iter_mut().for_each(|v| changes.add(clean_value(v))),
        Value::Object(obj) => obj.values_mut().for_each(|v| changes.add(clean_value(v))),
        _ => {}
    }
    changes
}

/// Which records `clean` keeps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CleanRules {
    /// Drop records whose cleaned text has fewer characters.
    pub min_chars: Option<usize>,
    /// Drop records whose cleaned text has more characters.
    pub max_chars: Option<usize>,
    /// Keep only records detected as one of these languages (empty: any).
    pub languages: Vec<String>,
}

impl CleanRules {
    pub fn validate(&self) -> Result<()> {
        for l in &self.languages {
            if l != "unknown" && !LANGUAGES.contains(&l.as_str()) {
                bail!("language '{l}': expected one of {}, unknown", LANGUAGES.join(", "));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_chars, self.max_chars) {
            if lo > hi {
                bail!("min chars {lo} is more than max chars {hi}");
            }
        }
        Ok(())
    }
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CleanEntry {
    #[serde(flatten)]
    pub origin: Origin,
    /// `changed` (kept, text cleaned) or `dropped`.
    pub action: &'static str,
    pub reasons: Vec<String>,
}

/// The records `clean` writes and what it did.
#[derive(Debug, Clone, Default)]
pub struct CleanOutcome {
    /// The kept records' lines: unchanged records byte for byte, changed ones re-serialised.
    pub lines: Vec<String>,
    pub records: usize,
    pub changed: usize,
    pub dropped: usize,
    pub entries: Vec<CleanEntry>,
}

/// Cleans the records of `files` and applies `rules` to the cleaned text content.
pub fn clean_files(kind: DataKind, files: &[PrepFile], rules: &CleanRules) -> Result<CleanOutcome> {
    rules.validate()?;
    let mut out = CleanOutcome::default();
    for file in files {
        for record in &file.records {
            out.records += 1;
            let (line, text, changes) = match &record.value {
                None => {
                    let (t, c) = clean_text(&record.raw);
                    (t.replace('\n', " "), t, c)
                }
                Some(value) => {
                    let mut v = value.clone();
                    let c = clean_value(&mut v);
                    if !c.any() {
                        (record.raw.clone(), record.text.clone(), c)
                    } else {
                        let format = file.format.ok_or_else(|| anyhow::anyhow!("{}: no format", record.origin))?;
                        let obj = v.as_object().ok_or_else(|| anyhow::anyhow!("{}: not an object", record.origin))?;
                        let text = content_of(kind, format, obj, &record.origin)
                            .map_err(|e| anyhow::anyhow!("{}: after cleaning: {e}", record.origin))?
                            .0;
                        (serde_json::to_string(&v)?, text, c)
                    }
                }
            };
            let mut drop = Vec::new();
            let chars = text.chars().count();
            if let Some(min) = rules.min_chars.filter(|&m| chars < m) {
                drop.push(format!("{chars} characters, fewer than {min}"));
            }
            if let Some(max) = rules.max_chars.filter(|&m| chars > m) {
                drop.push(format!("{chars} characters, more than {max}"));
            }
            if !rules.languages.is_empty() {
                let d = detect_language(&text);
                if !rules.languages.iter().any(|l| l == d.language) {
                    drop.push(format!(
                        "language {} ({:.0}% of letters), not {}",
                        d.language,
                        d.share * 100.0,
                        rules.languages.join(" or ")
                    ));
                }
            }
            if !drop.is_empty() {
                out.dropped += 1;
                let mut reasons = changes.describe();
                reasons.splice(0..0, drop);
                out.entries.push(CleanEntry { origin: record.origin.clone(), action: "dropped", reasons });
                continue;
            }
            if changes.any() {
                out.changed += 1;
                out.entries.push(CleanEntry {
                    origin: record.origin.clone(),
                    action: "changed",
                    reasons: changes.describe(),
                });
            }
            out.lines.push(line);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_html_entities_controls_and_extra_whitespace() {
        let (t, c) = clean_text("<p>发烧&nbsp;怎么办？</p><br/>多喝水&amp;休息\u{0007}\u{200B}  ");
        assert_eq!(t, "发烧 怎么办？\n\n多喝水&休息");
        assert_eq!((c.html_tags, c.entities, c.control_chars, c.whitespace), (3, 2, 2, true));
        let (t, c) = clean_text("血压<140 且 >90 时 a<b");
        assert_eq!(t, "血压<140 且 >90 时 a<b", "a '<' that starts no tag is text");
        assert!(!c.any());
        let (t, _) = clean_text("a\r\n\r\n\r\n\tb&#39;s &#x4e2d; &foo;");
        assert_eq!(t, "a\n\nb's 中 &foo;");
        let (t, c) = clean_text("<!-- ad --><span style=\"x\">Hi</span>");
        assert_eq!((t.as_str(), c.html_tags), ("Hi", 3));
    }

    #[test]
    fn cleans_every_string_of_a_record() {
        let mut v = serde_json::json!({"conversations": [{"from": "human", "value": " <b>Q</b> "}], "n": 1});
        let c = clean_value(&mut v);
        assert_eq!(v["conversations"][0]["value"], "Q");
        assert_eq!(c.html_tags, 2);
        assert!(CleanRules { languages: vec!["xx".into()], ..Default::default() }.validate().is_err());
    }
}
