//! Stop strings matched on the detokenized text as it streams, across token boundaries.
//!
//! Text is released only when no stop string can still begin in it: the longest suffix of the
//! pending text that is a prefix of some stop string is held back until the next piece settles
//! it. So a stop string split over several tokens is caught and never sent, and everything before
//! it is sent exactly once.

#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What one piece of text released.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Text safe to send.
    pub text: String,
    /// A stop string matched: `text` ends right before it; generation must end.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: piece.to_string(),
                stopped: false,
            };
        }
        self.pending.push_str(piece);
        // The earliest-starting match among the stop strings.
        if let Some(start) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let mut text = std::mem::take(&mut self.pending);
            text.truncate(start);
            return Released {
                text,
                stopped: true,
            };
        }
        let hold = self.held_suffix_len();
        let keep = self.pending.split_off(self.pending.len() - hold);
        let text = std::mem::replace(&mut self.pending, keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// The text still held back (generation ended without a match).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(p.len());
            for len in (best + 1..=max).rev() {
                let start = p.len() - len;
                if p.is_char_boundary(start) && stop.as_bytes().starts_with(&p.as_bytes()[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Independent reference: after each piece, search the whole text so far.
    fn reference(pieces: &[String], stops: &[String]) -> (String, bool) {
        let mut text = String::new();
        for p in pieces {
            text.push_str(p);
            if let Some(start) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(start);
                return (text, true);
            }
        }
        (text, false)
    }

    fn run(pieces: &[String], stops: &[String]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.to_vec());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_split_over_tokens_is_not_sent() {
        let pieces: Vec<String> = ["Hello", " wor", "ld", "!"].map(String::from).to_vec();
        let stops = vec!["world".to_string()];
        let mut m = StopMatcher::new(stops);
        assert_eq!(m.push(&pieces[0]).text, "Hello");
        // " wor" could start "world": held back.
        assert_eq!(m.push(&pieces[1]).text, " ");
        let r = m.push(&pieces[2]);
        assert_eq!(
            r,
            Released {
                text: "".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["abc".into()]);
        assert_eq!(m.push("xab").text, "x");
        assert_eq!(m.push("d").text, "abd");
        assert_eq!(m.finish(), "");
        let mut m = StopMatcher::new(vec!["abc".into()]);
        assert_eq!(m.push("ab").text, "");
        assert_eq!(m.finish(), "ab");
    }

    proptest! {
        #[test]
        fn matches_the_reference(
            pieces in proptest::collection::vec("[abé]{0,4}", 0..12),
            stops in proptest::collection::vec("[abé]{1,3}", 0..3),
        ) {
            prop_assert_eq!(run(&pieces, &stops), reference(&pieces, &stops));
        }
    }
}
