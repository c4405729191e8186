//! The CLIP tokenizer against the transformers 5 reference ids.

use std::path::{Path, PathBuf};

use serde_json::Value;
use t2v::error::Error;
use t2v::tokenizer::ClipTokenizer;
use tempfile::TempDir;

/// Where the reference fixtures live (`tokenizer_cases.json`, `tiny-t2v/`).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tokenizer_dir() -> PathBuf {
    fixtures().join("tiny-t2v/tokenizer")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// A fresh copy of the fixture tokenizer folder, to edit (removed when dropped).
fn temp_copy() -> TempDir {
    let dir = TempDir::new().unwrap();
    for f in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_dir().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn matches_reference_cases() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    let tok = ClipTokenizer::from_folder(&tokenizer_dir()).unwrap();
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.bos_id(), 49406);
    assert_eq!(tok.eos_id(), 49407);
    let pad_token = cases["pad_token"].as_str().unwrap();
    assert_eq!(pad_token, "!");
    assert_eq!(tok.pad_id(), 0);

    let cases = cases["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want_padded = ids(&case["input_ids_padded"]);
        let want_full = ids(&case["input_ids_untruncated"]);
        let full = tok.encode_untruncated(prompt).unwrap();
        let padded = tok.encode_padded(prompt).unwrap();
        if full != want_full {
            failures.push(format!("untruncated {prompt:?}:\n  got  {full:?}\n  want {want_full:?}"));
        }
        if padded.ids != want_padded {
            failures.push(format!("padded {prompt:?}:\n  got  {:?}\n  want {want_padded:?}", padded.ids));
        }
        assert_eq!(padded.ids.len(), tok.max_length());
        assert_eq!(padded.truncated, want_full.len() > tok.max_length(), "{prompt:?}");
        assert_eq!(padded.untruncated_len, want_full.len());
        let real = want_full.len().min(tok.max_length());
        assert_eq!(padded.attention_mask.iter().filter(|&&m| m == 1).count(), real);
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn truncation_keeps_bos_and_eos() {
    let tok = ClipTokenizer::from_folder(&tokenizer_dir()).unwrap();
    let prompt = vec!["cat"; 200].join(" ");
    let enc = tok.encode_padded(&prompt).unwrap();
    assert!(enc.truncated);
    assert_eq!(enc.untruncated_len, 202);
    assert_eq!(enc.ids.len(), 77);
    assert_eq!(enc.ids[0], tok.bos_id());
    assert_eq!(enc.ids[76], tok.eos_id());
    // exactly full: 75 words + bos + eos, not truncated
    let prompt = vec!["cat"; 75].join(" ");
    let enc = tok.encode_padded(&prompt).unwrap();
    assert!(!enc.truncated);
    assert_eq!(enc.ids[76], tok.eos_id());
}

#[test]
fn decode_round_trip() {
    let tok = ClipTokenizer::from_folder(&tokenizer_dir()).unwrap();
    let ids = tok.encode_untruncated("A photo of a Café!").unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "a photo of a café");
    assert_eq!(tok.decode(&ids[1..ids.len() - 1], false).unwrap(), "a photo of a café !");
    // as transformers: `café</w>` + `!`
}

#[test]
fn pad_falls_back_to_tokenizer_config() {
    let temp = temp_copy();
    let dir = temp.path();
    let map_path = dir.join("special_tokens_map.json");
    let mut map: Value = serde_json::from_str(&std::fs::read_to_string(&map_path).unwrap()).unwrap();
    map.as_object_mut().unwrap().remove("pad_token");
    std::fs::write(&map_path, serde_json::to_string_pretty(&map).unwrap()).unwrap();

    let tok = ClipTokenizer::from_folder(dir).unwrap();
    // tokenizer_config.json names <|endoftext|>
    assert_eq!(tok.pad_id(), 49407);
    let enc = tok.encode_padded("a photo of a cat").unwrap();
    assert_eq!(&enc.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(enc.ids[7..].iter().all(|&id| id == 49407));
    // and "!" is an ordinary token again: "!!!" is one BPE word
    let ids = tok.encode_untruncated("wow!!!").unwrap();
    assert!(!ids[1..ids.len() - 1].contains(&0), "{ids:?}");

    // with no special_tokens_map.json at all, tokenizer_config.json still decides
    std::fs::remove_file(&map_path).unwrap();
    let tok = ClipTokenizer::from_folder(dir).unwrap();
    assert_eq!(tok.pad_id(), 49407);
}

#[test]
fn max_length_fallback() {
    let temp = temp_copy();
    let dir = temp.path();
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_max_length"] = serde_json::json!(1000000000000000019884624838656.0f64);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(ClipTokenizer::from_folder(dir).unwrap().max_length(), 77);
    cfg.as_object_mut().unwrap().remove("model_max_length");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(ClipTokenizer::from_folder(dir).unwrap().max_length(), 77);
    cfg["model_max_length"] = serde_json::json!(16);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let tok = ClipTokenizer::from_folder(dir).unwrap();
    assert_eq!(tok.max_length(), 16);
    assert_eq!(tok.encode_padded("a photo of a cat").unwrap().ids.len(), 16);
}

#[test]
fn missing_vocab_is_reported() {
    let temp = temp_copy();
    let dir = temp.path();
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let err = ClipTokenizer::from_folder(dir).unwrap_err();
    assert!(matches!(&err, Error::FileMissing { path, .. } if path.ends_with("vocab.json")), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("vocab.json"), "{msg}");
    assert!(msg.contains("download"), "{msg}");
}
