//! Stop sequences matched across token boundaries: text that could still
//! become a stop string is held back until it cannot, and a match cuts the
//! text where the stop string begins.

/// Watches generated text for stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
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
            pending: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
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
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
