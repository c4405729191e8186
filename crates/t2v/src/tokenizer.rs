//! The CLIP BPE tokenizer, as transformers 5 builds it (`CLIPTokenizer`, a `tokenizers`-backed
//! tokenizer made from `vocab.json` + `merges.txt`) when diffusers loads a model's `tokenizer/` folder.
//!
//! The pipeline, rebuilt with the `tokenizers` crate exactly as `transformers/models/clip/tokenization_clip.py`
//! builds it:
//! - normalizer: `NFC`, then `Replace(/\s+/, " ")`, then `Lowercase` (no strip: the pre-tokenizer drops
//!   whitespace anyway);
//! - pre-tokenizer: `Split(<CLIP regex>, behavior=removed, invert=true)`, then `ByteLevel(add_prefix_space=false)`;
//! - model: BPE from vocab + merges, `end_of_word_suffix = "</w>"`, no continuing-subword prefix,
//!   `unk = <unk_token>`, `fuse_unk = false`;
//! - post-processor: `<bos> ... <eos>` (transformers uses `RobertaProcessing(eos, bos)` for this);
//! - every named special token (bos, eos, unk, pad, ...) and extra special token is registered as an added
//!   token, so it is split out of the text before normalization/BPE. This matters: with the pad token `!`
//!   of the published checkpoints, `"try!!!"` becomes `try</w> ! ! !` (id 0 three times), not `try</w> !!!</w>`.
//!
//! Special tokens are resolved the way transformers 5 `from_pretrained` does: `tokenizer_config.json` gives
//! the defaults and `special_tokens_map.json` overrides them key by key, unless `tokenizer_config.json` has an
//! `added_tokens_decoder` (newer saves), in which case transformers ignores `special_tokens_map.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::files::FileKind;

/// CLIP's pre-tokenization pattern, verbatim from transformers 5 `tokenization_clip.py`.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const END_OF_WORD: &str = "</w>";
/// Used when `model_max_length` is missing or is transformers' "unbounded" sentinel (1e30).
const DEFAULT_MAX_LENGTH: usize = 77;
/// Anything above this is treated as "no limit given" (transformers writes 1e30 for that).
const ABSURD_MAX_LENGTH: f64 = 1.0e6;

/// The named special-token keys transformers knows (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A tokenized prompt of exactly `max_length` ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `bos, tokens..., eos, pad...`, exactly `max_length` long.
    pub ids: Vec<u32>,
    /// 1 for `bos`, the tokens and `eos`; 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Whether the prompt had to be cut to fit (`untruncated_len > max_length`).
    pub truncated: bool,
    /// Length of the untruncated encoding, `bos` and `eos` included.
    pub untruncated_len: usize,
}

/// A special token as the config files describe it.
#[derive(Debug, Clone)]
struct TokenSpec {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
}

impl TokenSpec {
    fn plain(content: &str) -> Self {
        // transformers turns a bare string into `AddedToken(s, special=True)`: normalized defaults to false.
        TokenSpec { content: content.to_owned(), single_word: false, lstrip: false, rstrip: false, normalized: false }
    }

    fn added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// The CLIP tokenizer of a diffusers model folder.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

fn tk_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

fn require_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    // Only a file that is not there is "missing"; one that is there but unreadable, or not a
    // file, gets its own error.
    match crate::files::open_regular(&path, FileKind::Tokenizer) {
        Ok(_) => Ok(path),
        Err(e) if crate::files::is_missing(&e) => Err(Error::FileMissing {
            path,
            hint: format!(
                "the tokenizer folder needs vocab.json, merges.txt and tokenizer_config.json \
                 (special_tokens_map.json is optional); the download of {name} is missing or incomplete: \
                 download the model's tokenizer/ folder again"
            ),
        }),
        Err(e) => Err(e),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::files::read_text(path, FileKind::Tokenizer)?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_owned(), reason: e.to_string() })
}

/// Parses a special-token entry: a string, an `AddedToken` object (`{"content": ..., ...}`), or null.
fn parse_token(path: &Path, key: &str, value: &Value) -> Result<Option<TokenSpec>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TokenSpec::plain(s))),
        Value::Object(m) => {
            let content = m.get("content").and_then(Value::as_str).ok_or_else(|| Error::Config {
                path: path.to_owned(),
                reason: format!("`{key}` is an object without a string `content`"),
            })?;
            let flag = |name: &str, default: bool| m.get(name).and_then(Value::as_bool).unwrap_or(default);
            Ok(Some(TokenSpec {
                content: content.to_owned(),
                single_word: flag("single_word", false),
                lstrip: flag("lstrip", false),
                rstrip: flag("rstrip", false),
                // python `AddedToken(..., special=True)` defaults `normalized` to `not special`.
                normalized: flag("normalized", false),
            }))
        }
        other => Err(Error::Config {
            path: path.to_owned(),
            reason: format!("`{key}` should be a string or a token object, found {other}"),
        }),
    }
}

fn parse_token_list(path: &Path, key: &str, value: &Value) -> Result<Vec<TokenSpec>> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => Ok(items
            .iter()
            .map(|v| parse_token(path, key, v))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect()),
        // transformers 5 also accepts a {name: token} dict of model-specific extra special tokens.
        Value::Object(m) if !m.contains_key("content") => Ok(m
            .values()
            .map(|v| parse_token(path, key, v))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect()),
        other => Ok(parse_token(path, key, other)?.into_iter().collect()),
    }
}

/// Named special tokens: key absent -> CLIPTokenizer's default; key present -> the file's value (null = none).
#[derive(Default)]
struct SpecialTokens {
    named: HashMap<&'static str, Option<TokenSpec>>,
    extra: Vec<TokenSpec>,
}

impl SpecialTokens {
    /// Sets every named key present in `obj` (later calls override earlier ones), and collects extra tokens.
    fn merge_from(&mut self, path: &Path, obj: &serde_json::Map<String, Value>) -> Result<()> {
        for key in SPECIAL_KEYS {
            if let Some(v) = obj.get(key) {
                self.named.insert(key, parse_token(path, key, v)?);
            }
        }
        for key in ["extra_special_tokens", "additional_special_tokens"] {
            if let Some(v) = obj.get(key) {
                self.extra.extend(parse_token_list(path, key, v)?);
            }
        }
        Ok(())
    }

    /// The token for `key`, with CLIPTokenizer's constructor defaults for absent keys.
    fn get(&self, key: &str) -> Option<TokenSpec> {
        match self.named.get(key) {
            Some(spec) => spec.clone(),
            None => match key {
                "bos_token" => Some(TokenSpec::plain("<|startoftext|>")),
                "eos_token" | "unk_token" | "pad_token" => Some(TokenSpec::plain("<|endoftext|>")),
                _ => None,
            },
        }
    }
}

fn parse_vocab(path: &Path) -> Result<Vocab> {
    let value = read_json(path)?;
    let Value::Object(map) = value else {
        return Err(Error::Config { path: path.to_owned(), reason: "expected a JSON object {token: id}".into() });
    };
    map.into_iter()
        .map(|(token, id)| {
            let id = id.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| Error::Config {
                path: path.to_owned(),
                reason: format!("token {token:?} has id {id}, expected a non-negative integer"),
            })?;
            Ok((token, id))
        })
        .collect()
}

fn parse_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = crate::files::read_text(path, FileKind::Tokenizer)?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        // Same rules as `tokenizers`' merges reader: skip the `#version` header and blank lines.
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(Error::Config {
                path: path.to_owned(),
                reason: format!("line {}: expected two space-separated symbols, found {line:?}", n + 1),
            });
        }
        merges.push((parts[0].to_owned(), parts[1].to_owned()));
    }
    Ok(merges)
}

fn parse_max_length(path: &Path, config: &serde_json::Map<String, Value>) -> Result<usize> {
    match config.get("model_max_length") {
        None | Some(Value::Null) => Ok(DEFAULT_MAX_LENGTH),
        Some(v) => {
            let n = v.as_f64().ok_or_else(|| Error::Config {
                path: path.to_owned(),
                reason: format!("`model_max_length` should be a number, found {v}"),
            })?;
            if !(n.is_finite()) || n > ABSURD_MAX_LENGTH {
                Ok(DEFAULT_MAX_LENGTH)
            } else if n < 2.0 || n.fract() != 0.0 {
                Err(Error::Config {
                    path: path.to_owned(),
                    reason: format!("`model_max_length` is {v}: it must be an integer of at least 2 (bos + eos)"),
                })
            } else {
                Ok(n as usize)
            }
        }
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer from a diffusers model's `tokenizer/` folder.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let vocab_path = require_file(dir, "vocab.json")?;
        let merges_path = require_file(dir, "merges.txt")?;
        let config_path = require_file(dir, "tokenizer_config.json")?;
        let map_path = dir.join("special_tokens_map.json");

        let config = match read_json(&config_path)? {
            Value::Object(m) => m,
            _ => {
                return Err(Error::Config { path: config_path, reason: "expected a JSON object".into() });
            }
        };
        let max_length = parse_max_length(&config_path, &config)?;

        // Special tokens, resolved as transformers 5 `from_pretrained` does.
        let mut specials = SpecialTokens::default();
        specials.merge_from(&config_path, &config)?;
        let mut decoder_tokens = Vec::new();
        if let Some(decoder) = config.get("added_tokens_decoder") {
            // Newer saves list their added tokens here; transformers then ignores special_tokens_map.json and
            // takes each named token's flags from the matching entry.
            let Value::Object(entries) = decoder else {
                return Err(Error::Config {
                    path: config_path,
                    reason: "`added_tokens_decoder` should be an object {id: token}".into(),
                });
            };
            let mut sorted: Vec<(u64, &Value)> = entries
                .iter()
                .map(|(k, v)| {
                    k.parse::<u64>().map(|id| (id, v)).map_err(|_| Error::Config {
                        path: config_path.clone(),
                        reason: format!("`added_tokens_decoder` key {k:?} is not a token id"),
                    })
                })
                .collect::<Result<_>>()?;
            sorted.sort_by_key(|(id, _)| *id);
            for (_, v) in sorted {
                if let Some(spec) = parse_token(&config_path, "added_tokens_decoder", v)? {
                    decoder_tokens.push(spec);
                }
            }
            for key in SPECIAL_KEYS {
                if let Some(Some(spec)) = specials.named.get(key) {
                    if let Some(full) = decoder_tokens.iter().find(|t| t.content == spec.content) {
                        specials.named.insert(key, Some(full.clone()));
                    }
                }
            }
        } else if map_path.exists() {
            match read_json(&map_path)? {
                Value::Object(m) => specials.merge_from(&map_path, &m)?,
                _ => return Err(Error::Config { path: map_path, reason: "expected a JSON object".into() }),
            }
        }

        let unk = specials.get("unk_token");
        let bos = specials.get("bos_token").ok_or_else(|| Error::Config {
            path: config_path.clone(),
            reason: "`bos_token` is null: CLIP needs a start-of-text token".into(),
        })?;
        let eos = specials.get("eos_token").ok_or_else(|| Error::Config {
            path: config_path.clone(),
            reason: "`eos_token` is null: CLIP needs an end-of-text token".into(),
        })?;
        let pad = specials.get("pad_token").ok_or_else(|| Error::Config {
            path: config_path.clone(),
            reason: "`pad_token` is null: prompts are padded to model_max_length, so a pad token is needed".into(),
        })?;

        // The model.
        let vocab = parse_vocab(&vocab_path)?;
        let merges = parse_merges(&merges_path)?;
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD.to_owned())
            .fuse_unk(false);
        if let Some(unk) = &unk {
            bpe = bpe.unk_token(unk.content.clone());
        }
        let bpe = bpe.build().map_err(|e| Error::Config {
            path: merges_path.clone(),
            reason: format!("vocab.json and merges.txt do not fit together: {e}"),
        })?;

        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| tk_err("whitespace normalizer", e))?
                .into(),
            Lowercase.into(),
        ]);
        tokenizer.with_normalizer(Some(normalizer)).map_err(|e| tk_err("normalizer", e))?;
        let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| tk_err("pre-tokenizer pattern", e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        // Added (special) tokens: the named ones in transformers' order, then extra special tokens,
        // then any other `added_tokens_decoder` entries. Re-adding the same content overrides its flags.
        let mut added: Vec<AddedToken> = decoder_tokens.iter().map(TokenSpec::added_token).collect();
        for key in SPECIAL_KEYS {
            if let Some(spec) = specials.get(key) {
                added.push(spec.added_token());
            }
        }
        added.extend(specials.extra.iter().map(TokenSpec::added_token));
        tokenizer.add_special_tokens(added).map_err(|e| tk_err("adding special tokens", e))?;

        let id_of = |spec: &TokenSpec, key: &str| {
            tokenizer.token_to_id(&spec.content).ok_or_else(|| Error::Config {
                path: vocab_path.clone(),
                reason: format!("{key} {:?} is not in the vocabulary", spec.content),
            })
        };
        let bos_id = id_of(&bos, "bos_token")?;
        let eos_id = id_of(&eos, "eos_token")?;
        let pad_id = id_of(&pad, "pad_token")?;

        Ok(ClipTokenizer { tokenizer, max_length, bos_id, eos_id, pad_id })
    }

    /// The padded length of a prompt (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The BPE ids of `text`, without bos/eos.
    fn encode_body(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode_fast(text, false).map_err(|e| tk_err("encoding the prompt", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `bos, tokens..., eos`: no truncation, no padding.
    pub fn encode_untruncated(&self, text: &str) -> Result<Vec<u32>> {
        let body = self.encode_body(text)?;
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.push(self.bos_id);
        ids.extend(body);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// `bos, tokens..., eos, pad...` of exactly `max_length` ids; tokens beyond `max_length - 2` are dropped
    /// (the end of the prompt), and `eos` is kept, as transformers does with `truncation=True`.
    pub fn encode_padded(&self, text: &str) -> Result<Encoded> {
        let body = self.encode_body(text)?;
        let untruncated_len = body.len() + 2;
        let keep = body.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos_id);
        let real = ids.len();
        ids.resize(self.max_length, self.pad_id);
        let mut attention_mask = vec![1u32; real];
        attention_mask.resize(self.max_length, 0);
        Ok(Encoded { ids, attention_mask, truncated: untruncated_len > self.max_length, untruncated_len })
    }

    /// Text of `ids` as transformers' `CLIPTokenizer.decode` gives it (`</w>` becomes a space, ends trimmed).
    /// Useful to tell the user which part of a prompt was cut off.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| tk_err("decoding ids", e))?;
        Ok(text.replace(END_OF_WORD, " ").trim().to_owned())
    }
}
