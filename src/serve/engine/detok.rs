//! Token bytes to text, incrementally: complete UTF-8 characters are
//! released as soon as their last byte arrives, special tokens produce no
//! text, and the first bytes can be skipped (the part of a healed token that
//! the prompt already contains).

use std::sync::Arc;

/// Incremental detokenizer over a precomputed id → bytes table.
#[derive(Debug)]
pub struct Detokenizer {
    token_bytes: Arc<Vec<Vec<u8>>>,
    special: Arc<Vec<bool>>,
    buf: Vec<u8>,
    skip: usize,
}

impl Detokenizer {
    /// A detokenizer that drops the first `skip` bytes it sees.
    pub fn new(token_bytes: Arc<Vec<Vec<u8>>>, special: Arc<Vec<bool>>, skip: usize) -> Self {
        Self {
            token_bytes,
            special,
            buf: Vec::new(),
            skip,
        }
    }

    /// Adds a token; returns the text it completes.
    pub fn push(&mut self, id: u32) -> String {
        if self.special.get(id as usize).copied().unwrap_or(false) {
            return String::new();
        }
        let mut bytes = self.token_bytes.get(id as usize).map_or(&[][..], |b| b.as_slice());
        if self.skip > 0 {
            let n = self.skip.min(bytes.len());
            bytes = &bytes[n..];
            self.skip -= n;
        }
        self.buf.extend_from_slice(bytes);
        let complete = complete_prefix_len(&self.buf);
        let text = String::from_utf8_lossy(&self.buf[..complete]).into_owned();
        self.buf.drain(..complete);
        text
    }

    /// Whatever bytes remain (an incomplete character at the end), lossy.
    pub fn flush(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        text
    }
}

/// Length of the longest prefix of `buf` that does not end inside a UTF-8
/// sequence which later bytes could still complete.
fn complete_prefix_len(buf: &[u8]) -> usize {
    let n = buf.len();
    // A character is at most 4 bytes: look at the last 3 for an unfinished lead byte.
    for back in 1..=3.min(n) {
        let b = buf[n - back];
        if b & 0b1100_0000 != 0b1000_0000 {
            let need = if b >= 0xF0 {
                4
            } else if b >= 0xE0 {
                3
            } else if b >= 0xC0 {
                2
            } else {
                1
            };
            return if need > back { n - back } else { n };
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detok(tokens: &[&[u8]], skip: usize) -> Detokenizer {
        let table: Vec<Vec<u8>> = tokens.iter().map(|t| t.to_vec()).collect();
        let special = vec![false; table.len()];
        Detokenizer::new(Arc::new(table), Arc::new(special), skip)
    }

    #[test]
    fn holds_split_characters_until_complete() {
        let e = "é".as_bytes();
        let mut d = detok(&[b"ab", &e[..1], &e[1..]], 0);
        assert_eq!(d.push(0), "ab");
        assert_eq!(d.push(1), "");
        assert_eq!(d.push(2), "é");
    }

    #[test]
    fn skips_the_healed_prefix() {
        let mut d = detok(&[b"urn", b" x"], 1);
        assert_eq!(d.push(0), "rn");
        assert_eq!(d.push(1), " x");
    }
}
