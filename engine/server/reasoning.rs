//! `--reasoning-parser deepseek-r1`: splits a completion into `reasoning_content` (the thinking
//! before `</think>`) and `content`. R1 starts thinking right after the prompt, so text is
//! reasoning until the end tag; a leading `<think>` is dropped. Works on streamed deltas: a
//! partial tag at the end of a delta is held back until the next one decides it.

const START: &str = "<think>";
const END: &str = "</think>";

#[derive(Debug, Default)]
pub struct ReasoningParser {
    in_reasoning: bool,
    started: bool,
    pending: String,
}

/// (reasoning, content) parts of one delta.
pub type Split = (String, String);

fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len()).rev().find(|&k| s.ends_with(&tag[..k])).unwrap_or(0)
}

impl ReasoningParser {
    pub fn new() -> Self {
        ReasoningParser { in_reasoning: true, started: false, pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> Split {
        self.pending.push_str(delta);
        let mut out = (String::new(), String::new());
        if !self.started {
            let t = self.pending.trim_start();
            if t.len() < START.len() && START.starts_with(t) {
                return out; // could still become "<think>"
            }
            if let Some(rest) = t.strip_prefix(START) {
                self.pending = rest.to_string();
            }
            self.started = true;
        }
        if self.in_reasoning {
            if let Some(i) = self.pending.find(END) {
                out.0 = self.pending[..i].to_string();
                let rest = self.pending[i + END.len()..].to_string();
                self.in_reasoning = false;
                self.pending.clear();
                out.1 = rest;
                return out;
            }
            let hold = partial_suffix(&self.pending, END);
            let cut = self.pending.len() - hold;
            out.0 = self.pending[..cut].to_string();
            self.pending = self.pending[cut..].to_string();
        } else {
            out.1 = std::mem::take(&mut self.pending);
        }
        out
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.pending);
        if self.in_reasoning { (rest, String::new()) } else { (String::new(), rest) }
    }

    /// Splits a whole completion.
    pub fn split_all(text: &str) -> Split {
        let mut p = ReasoningParser::new();
        let (mut r, mut c) = p.push(text);
        let (r2, c2) = p.finish();
        r.push_str(&r2);
        c.push_str(&c2);
        (r, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_streamed_agree() {
        let text = "<think>\nLet me think.\n</think>\n\nThe answer is 4.";
        let (r, c) = ReasoningParser::split_all(text);
        assert_eq!(r, "\nLet me think.\n");
        assert_eq!(c, "\n\nThe answer is 4.");
        for step in 1..6 {
            let mut p = ReasoningParser::new();
            let (mut rr, mut cc) = (String::new(), String::new());
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(step) {
                let (a, b) = p.push(&chunk.iter().collect::<String>());
                rr.push_str(&a);
                cc.push_str(&b);
            }
            let (a, b) = p.finish();
            rr.push_str(&a);
            cc.push_str(&b);
            assert_eq!((rr, cc), (r.clone(), c.clone()), "chunk size {step}");
        }
    }

    #[test]
    fn no_end_tag_is_all_reasoning() {
        assert_eq!(ReasoningParser::split_all("thinking still"), ("thinking still".into(), String::new()));
    }
}
