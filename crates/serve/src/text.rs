//! From tokens to the text a client sees: incremental detokenisation that never emits half a
//! UTF-8 character, stop strings (the text is cut before them, held back while a stop string
//! may still be starting), and the bytes of each token for log-probability reports.
use align_core::infer::engine::{FinishReason, StepToken, TokenLogprob};
use align_core::ModelTokenizer;
use anyhow::Result;

/// What one token added to a choice.
#[derive(Debug, Default)]
pub struct Delta {
    pub text: String,
    /// Log-probabilities of the tokens this delta's text comes from.
    pub logprobs: Vec<TokenLogprob>,
    /// "stop" or "length" on the choice's last delta.
    pub finish: Option<&'static str>,
}

/// The text of one choice as it is generated.
pub struct ChoiceText {
    stops: Vec<String>,
    tokens: Vec<i64>,
    /// Bytes of `text` already given to the client.
    emitted: usize,
    text: String,
    pending: Vec<TokenLogprob>,
    /// Tokens the engine produced for this choice (usage counts every one).
    pub generated: usize,
    pub finish: Option<&'static str>,
}

impl ChoiceText {
    pub fn new(stops: Vec<String>) -> Self {
        ChoiceText {
            stops,
            tokens: Vec::new(),
            emitted: 0,
            text: String::new(),
            pending: Vec::new(),
            generated: 0,
            finish: None,
        }
    }

    /// The whole text so far (what a non-streaming response returns).
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// Takes one token; returns the text that may be shown now. After a stop string or the
    /// last token the choice is finished (`finish` set) and takes no more tokens.
    pub fn push(&mut self, tok: &ModelTokenizer, step: &StepToken) -> Result<Delta> {
        if self.finish.is_some() {
            return Ok(Delta::default());
        }
        self.generated += 1;
        if step.finish != Some(FinishReason::Eos) {
            self.tokens.push(step.token);
            if let Some(lp) = &step.logprob {
                self.pending.push(lp.clone());
            }
        }
        let mut full = tok.decode(&self.tokens, true)?;
        let mut finish = match step.finish {
            Some(FinishReason::Eos) => Some("stop"),
            Some(FinishReason::Length) => Some("length"),
            None => None,
        };
        // a stop string may end in this token: search from where it could have begun
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !full.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(cut) = self.stops.iter().filter_map(|s| full[from..].find(s.as_str()).map(|i| from + i)).min() {
            full.truncate(cut);
            finish = Some("stop");
        }
        let safe = if finish.is_some() {
            full.len()
        } else if full.ends_with('\u{FFFD}') {
            self.emitted.min(full.len()) // half a character: wait for its other bytes
        } else {
            full.len() - held_suffix(&full, &self.stops)
        };
        let mut delta = Delta { finish, ..Default::default() };
        // decoding is prefix-stable for the tokenizers we read; if it is not, wait for the end
        if safe > self.emitted && full.is_char_boundary(self.emitted) && full.is_char_boundary(safe) {
            delta.text = full[self.emitted..safe].to_string();
            self.emitted = safe;
            delta.logprobs = std::mem::take(&mut self.pending);
        } else if finish.is_some() {
            delta.logprobs = std::mem::take(&mut self.pending);
            self.emitted = self.emitted.min(full.len());
            while !full.is_char_boundary(self.emitted) {
                self.emitted -= 1;
            }
        }
        self.text = full;
        self.finish = finish;
        if finish.is_some() {
            self.emitted = self.text.len();
        }
        Ok(delta)
    }
}

/// Length of the longest suffix of `text` that is the beginning of a stop string (held back
/// until it is known not to be one).
fn held_suffix(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            let prefix = &s[..i];
            if i > best && text.ends_with(prefix) {
                best = i;
            }
        }
    }
    best
}

/// GPT-2's byte-level alphabet, inverted: the byte each printable stand-in character means.
fn byte_level_inverse() -> &'static std::collections::HashMap<char, u8> {
    static MAP: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut map = std::collections::HashMap::new();
        let mut extra = 0u32;
        for b in 0u32..256 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            if let Some(c) = char::from_u32(c) {
                map.insert(c, b as u8);
            }
        }
        map
    })
}

/// The bytes of one token (byte-level BPE tokens map back exactly; others through decoding) and
/// its text.
pub fn token_bytes(tok: &ModelTokenizer, id: i64) -> (String, Vec<u8>) {
    let piece = u32::try_from(id).ok().and_then(|i| tok.inner().id_to_token(i));
    if let Some(piece) = &piece {
        let inv = byte_level_inverse();
        let bytes: Option<Vec<u8>> = piece.chars().map(|c| inv.get(&c).copied()).collect();
        if let Some(bytes) = bytes {
            return (String::from_utf8_lossy(&bytes).into_owned(), bytes);
        }
    }
    let text = tok.decode(&[id], false).unwrap_or_default();
    let bytes = text.as_bytes().to_vec();
    (text, bytes)
}

#[cfg(test)]
mod tests {
    use super::held_suffix;

    #[test]
    fn a_stop_strings_beginning_is_held_back() {
        let stops = vec!["\nUser:".to_string(), "###".to_string()];
        assert_eq!(held_suffix("Hello\nUs", &stops), 3);
        assert_eq!(held_suffix("Hello #", &stops), 1);
        assert_eq!(held_suffix("Hello", &stops), 0);
    }
}
