//! Tokenizer (`tokenizer.json` through HF `tokenizers`), chat templates (minijinja), incremental
//! detokenization, and the built-in byte-level tokenizer of synthetic checkpoints.
pub mod byte_level;
mod chat_template;
mod detokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use detokenizer::IncrementalDecoder;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: {msg}")]
    File { file: PathBuf, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Codec(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<ChatTemplate>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// tokenizer_config.json's `add_bos_token`: transformers' Llama-style tokenizers prepend BOS when
    /// encoding with special tokens even though DeepSeek's tokenizer.json post-processor does not.
    add_bos_token: bool,
}

/// A special-token field of tokenizer_config.json: a string or an AddedToken object.
fn token_field(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (special tokens, chat template).
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| TokenizerError::File { file: tok_path.clone(), msg: format!("cannot load: {e}") })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let (mut bos_token, mut eos_token, mut chat, mut add_bos_token) = (None, None, None, false);
        if cfg_path.exists() {
            let ferr = |msg: String| TokenizerError::File { file: cfg_path.clone(), msg };
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ferr(format!("cannot read: {e}")))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ferr(format!("not valid JSON: {e}")))?;
            bos_token = token_field(v.get("bos_token"));
            eos_token = token_field(v.get("eos_token"));
            add_bos_token = v.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false);
            let template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
            if let Some(t) = template {
                chat = Some(ChatTemplate::new(&t, bos_token.clone(), eos_token.clone()).map_err(|e| ferr(e.to_string()))?);
            }
        }
        Ok(Tokenizer { inner, chat, bos_token, eos_token, add_bos_token })
    }

    /// The checkpoint's tokenizer, or None when it ships no tokenizer.json (token ids only then).
    pub fn load_if_present(dir: &Path) -> Result<Option<Self>, TokenizerError> {
        if dir.join("tokenizer.json").exists() { Self::load(dir).map(Some) } else { Ok(None) }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos_token {
            if let Some(bos) = self.bos_token.as_deref().and_then(|t| self.token_to_id(t)) {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders `messages` with the chat template and tokenizes the result (special tokens come
    /// from the template itself, as transformers' apply_chat_template does).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>, TokenizerError> {
        let chat = self.chat.as_ref().ok_or_else(|| TokenizerError::Template("this tokenizer has no chat_template in tokenizer_config.json".into()))?;
        let text = chat.render(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}
