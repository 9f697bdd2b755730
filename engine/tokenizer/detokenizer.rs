//! Incremental detokenization for streaming: text is released only once it is valid UTF-8, so a
//! multi-byte character split across tokens is never emitted broken (the method of HF's
//! text-generation-inference: decode a short window before and after the new token and emit the
//! difference unless it ends in U+FFFD).
use super::{Tokenizer, TokenizerError};

pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// `prompt` gives context for the first tokens (e.g. leading-space handling); it is not emitted.
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let keep = prompt.len().saturating_sub(5);
        let ids = prompt[keep..].to_vec();
        let n = ids.len();
        IncrementalDecoder { ids, prefix_offset: 0, read_offset: n, skip_special_tokens }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end of generation (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) { full[prefix.len()..].to_string() } else { String::new() })
    }
}
