//! The built-in tokenizer of synthetic checkpoints: byte-level BPE with no merges (one token per
//! byte) plus DeepSeek's special tokens and its chat template. It is written as ordinary
//! `tokenizer.json` / `tokenizer_config.json` files, so it loads through the same code (and through
//! Python's `tokenizers`) as a real checkpoint's tokenizer.
use serde_json::{json, Value};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const PAD: &str = "<｜▁pad▁｜>";
/// Specials after the 256 byte tokens, in id order.
pub const CHAT_SPECIALS: [(&str, bool); 4] = [("<｜User｜>", true), ("<｜Assistant｜>", true), ("<think>", false), ("</think>", false)];
/// DeepSeek-R1's chat template (from its tokenizer_config.json, MIT license).
pub const CHAT_TEMPLATE: &str = include_str!("deepseek_r1_chat_template.jinja");

/// First id of the byte tokens (after BOS, EOS, PAD).
pub const BYTE_BASE: u32 = 3;

/// Tokens in this tokenizer (the model's vocab_size may be larger, as DeepSeek's is).
pub fn vocab_len() -> usize {
    BYTE_BASE as usize + 256 + CHAT_SPECIALS.len()
}

/// GPT-2's byte → printable-character map used by byte-level BPE.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(&cs) {
        map[*b as usize] = char::from_u32(*c).unwrap();
    }
    map
}

fn added(id: u32, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": !special, "special": special})
}

/// The contents of tokenizer.json.
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    let mut added_tokens = vec![added(0, BOS, true), added(1, EOS, true), added(2, PAD, true)];
    for (i, name) in [BOS, EOS, PAD].iter().enumerate() {
        vocab.insert(name.to_string(), json!(i));
    }
    for (b, c) in bytes_to_unicode().iter().enumerate() {
        vocab.insert(c.to_string(), json!(BYTE_BASE + b as u32));
    }
    for (i, (name, special)) in CHAT_SPECIALS.iter().enumerate() {
        let id = BYTE_BASE + 256 + i as u32;
        vocab.insert(name.to_string(), json!(id));
        added_tokens.push(added(id, name, *special));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// The contents of tokenizer_config.json.
pub fn tokenizer_config_json() -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 16384,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    })
}

/// Writes both files into `dir`.
pub fn write_files(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string_pretty(&tokenizer_json()).unwrap())?;
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tokenizer_config_json()).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_any_text_byte_by_byte() {
        let dir = std::env::temp_dir().join(format!("engine-bytetok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_files(&dir).unwrap();
        let tok = crate::tokenizer::Tokenizer::load(&dir).unwrap();
        let text = "héllo, 世界! <｜User｜>x";
        let ids = tok.encode(text, false).unwrap();
        // every byte of the plain text is one token; the special token is one token
        assert_eq!(ids.len(), "héllo, 世界! ".len() + 1 + 1);
        assert_eq!(ids[ids.len() - 2], tok.token_to_id("<｜User｜>").unwrap());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.encode("a", true).unwrap(), vec![0, BYTE_BASE + b'a' as u32]);
        std::fs::remove_dir_all(dir).ok();
    }
}
