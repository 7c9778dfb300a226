//! Stop sequences matched across token boundaries: text that could still
//! become a stop string is held back until it cannot, and a match cuts the
//! text where the stop string begins. Optionally llama-server's `n_indent`:
//! once a line has ended, a later line whose indentation is below the
//! minimum stops generation before its first non-blank character (its
//! leading blanks are held back until the line's indentation is known, so
//! the cut text is never sent).

/// Watches generated text for stop strings (and a minimum indentation).
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    /// Lines after the first must be indented this far (0: no rule).
    min_indent: usize,
    /// The current line's indentation is not known yet (it began after a newline).
    line_open: bool,
    /// Its leading blanks, held back meanwhile.
    indent: String,
}

/// What a piece of text did.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to emit now (maybe empty).
    Emit(String),
    /// A stop string matched: emit this text (the part before it), then stop.
    Stopped(String),
}

impl StopMatcher {
    /// A matcher for the given (non-empty) stop strings.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Also stops at a line (after the first) indented by fewer than `n`
    /// blanks (spaces or tabs), as llama-server's `n_indent`.
    pub fn with_min_indent(mut self, n: usize) -> Self {
        self.min_indent = n;
        self
    }

    /// Adds generated text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
        match self.push_stops(piece) {
            StopOutcome::Emit(t) => match self.indentation(t) {
                (t, false) => StopOutcome::Emit(t),
                (t, true) => StopOutcome::Stopped(t),
            },
            StopOutcome::Stopped(t) => StopOutcome::Stopped(self.indentation(t).0),
        }
    }

    /// `text` with the minimum-indentation rule applied: what may be
    /// emitted, and whether a line fell short (the text then ends at its
    /// leading blanks).
    fn indentation(&mut self, text: String) -> (String, bool) {
        if self.min_indent == 0 {
            return (text, false);
        }
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if self.line_open {
                if c == ' ' || c == '\t' {
                    self.indent.push(c);
                    continue;
                }
                let width = self.indent.chars().count();
                out.push_str(&std::mem::take(&mut self.indent));
                if c != '\n' {
                    if width < self.min_indent {
                        return (out, true);
                    }
                    self.line_open = false;
                }
            }
            out.push(c);
            if c == '\n' {
                self.line_open = true;
            }
        }
        (out, false)
    }

    /// The stop strings' part of [`push`](Self::push).
    fn push_stops(&mut self, piece: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Emit(piece.to_owned());
        }
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return StopOutcome::Stopped(out);
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold].to_owned();
        self.pending.drain(..hold);
        StopOutcome::Emit(out)
    }

    /// Text still held back (emitted when generation ends for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.indent) + &std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one at a time; returns the text emitted and whether it stopped.
    fn feed(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Emit(t) => out += &t,
                StopOutcome::Stopped(t) => return (out + &t, true),
            }
        }
        (out, false)
    }

    #[test]
    fn a_line_indented_less_than_the_minimum_stops_before_its_text() {
        let mut m = StopMatcher::new(Vec::new()).with_min_indent(4);
        let (text, stopped) = feed(&mut m, &["x = 1", "\n", "  ", "  y", "\n", "\n", "  ", "z = 2"]);
        assert!(stopped);
        // The blank line passes; the short line keeps only its blanks, as llama-server cuts it.
        assert_eq!(text, "x = 1\n    y\n\n  ");
        // The first line is never checked; blanks wait until the line's indentation is known.
        let mut m = StopMatcher::new(Vec::new()).with_min_indent(2);
        assert_eq!(m.push("z\n "), StopOutcome::Emit("z\n".into()));
        assert_eq!(m.push(" ok"), StopOutcome::Emit("  ok".into()));
        assert_eq!(m.push("\n\t"), StopOutcome::Emit("\n".into()));
        assert_eq!(m.flush(), "\t");
        // With stop strings too.
        let mut m = StopMatcher::new(vec!["END".into()]).with_min_indent(4);
        assert_eq!(feed(&mut m, &["a\n    b E", "ND"]), ("a\n    b ".into(), true));
    }

    #[test]
    fn matches_across_pieces_and_cuts_before_the_stop() {
        let mut m = StopMatcher::new(vec!["\ndef".into()]);
        assert_eq!(m.push("x = 1"), StopOutcome::Emit("x = 1".into()));
        assert_eq!(m.push("\n"), StopOutcome::Emit(String::new()));
        assert_eq!(m.push("de"), StopOutcome::Emit(String::new()));
        assert_eq!(m.push("f foo"), StopOutcome::Stopped(String::new()));
    }

    #[test]
    fn releases_held_text_when_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["END".into(), "</s>".into()]);
        assert_eq!(m.push("abc E"), StopOutcome::Emit("abc ".into()));
        assert_eq!(m.push("Nx"), StopOutcome::Emit("ENx".into()));
        assert_eq!(m.push("<"), StopOutcome::Emit(String::new()));
        assert_eq!(m.flush(), "<");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_no_stops_passes_through() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(m.push("xxab"), StopOutcome::Stopped("xx".into()));
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("é"), StopOutcome::Emit("é".into()));
    }
}
