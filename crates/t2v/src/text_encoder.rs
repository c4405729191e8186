//! The text encoder: transformers' `CLIPTextModel` (pre-LN transformer with a causal mask and a
//! final layer norm), returning the last hidden state that conditions the UNet.
//!
//! candle-transformers has a CLIP text transformer, but its `Config` can only be built from
//! presets (private fields) and hard-codes the layer-norm epsilon, so the checkpoints' own
//! dimensions cannot be given to it: this is the same network, configured from `config.json`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear};

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`); defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

impl Config {
    /// Rejects values no text encoder can be built or run with, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| {
            Err(Error::InvalidConfig { path: "text_encoder/config.json".into(), key: key.into(), reason })
        };
        Activation::from_name(&self.hidden_act)?;
        crate::unet3d::check_dims(
            "text_encoder/config.json",
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        if !(1..=1 << 24).contains(&self.vocab_size) {
            return bad("vocab_size", format!("is {}: it must be 1 to {}", self.vocab_size, 1 << 24));
        }
        if self.num_hidden_layers > 1024 {
            return bad("num_hidden_layers", format!("is {}: it must be at most 1024", self.num_hidden_layers));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "hidden_size",
                format!("{} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads),
            );
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return bad("layer_norm_eps", format!("is {}: it must be a positive number", self.layer_norm_eps));
        }
        Ok(())
    }
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// The activations transformers' `ACT2FN` maps these names to.
#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x * sigmoid(1.702 x), as the original CLIP.
    QuickGelu,
}

impl Activation {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "quick_gelu" => Ok(Self::QuickGelu),
            other => Err(Error::InvalidArgument(format!(
                "text_encoder/config.json names the activation `{other}`; t2v supports gelu, gelu_new, gelu_pytorch_tanh and quick_gelu"
            ))),
        }
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl SelfAttention {
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq_len, width) = xs.dims3()?;
        let head_dim = width / self.num_heads;
        let heads = |t: Tensor| t.reshape((batch, seq_len, self.num_heads, head_dim))?.transpose(1, 2)?.contiguous();
        let scale = (head_dim as f64).powf(-0.5);
        let q = heads((self.q_proj.forward(xs)? * scale)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, seq_len, width))?;
        self.out_proj.forward(&out)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &Config, activation: Activation) -> candle_core::Result<Self> {
        let w = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: layer_norm(w, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention {
                q_proj: linear(w, w, attn.pp("q_proj"))?,
                k_proj: linear(w, w, attn.pp("k_proj"))?,
                v_proj: linear(w, w, attn.pp("v_proj"))?,
                out_proj: linear(w, w, attn.pp("out_proj"))?,
                num_heads: cfg.num_attention_heads,
            },
            layer_norm2: layer_norm(w, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(w, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, w, vb.pp("mlp.fc2"))?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = self.fc2.forward(&self.activation.forward(&h)?)?;
        xs + h
    }
}

/// `CLIPTextModel`: token ids (batch, seq) → last hidden state (batch, seq, hidden_size).
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    config: Config,
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let activation = Activation::from_name(&cfg.hidden_act)?;
        Ok(Self::build(vb, cfg, activation)?)
    }

    fn build(vb: VarBuilder, cfg: &Config, activation: Activation) -> candle_core::Result<Self> {
        // transformers ≥ 5 saves CLIPTextModel without the `text_model.` prefix that the
        // published checkpoints carry; both name the same tensors.
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let emb = vb.pp("embeddings");
        let enc = vb.pp("encoder.layers");
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(cfg.max_position_embeddings, cfg.hidden_size, emb.pp("position_embedding"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(enc.pp(i), cfg, activation))
                .collect::<candle_core::Result<_>>()?,
            final_layer_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `input_ids`: (batch, seq_len) u32 or i64 token ids, seq_len ≤ max_position_embeddings.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, seq_len) = input_ids.dims2()?;
        if seq_len > self.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "{seq_len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, seq_len as u32, device)?;
        let dtype = self.final_layer_norm.weight().dtype();
        let xs = self
            .token_embedding
            .forward(&input_ids, dtype)?
            .broadcast_add(&self.position_embedding.forward(&positions, dtype)?)?;
        let mask = causal_mask(seq_len, dtype, device)?;
        let mut xs = xs;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
    }
}

/// Additive mask that hides later tokens: 0 on and below the diagonal, the dtype's lowest value
/// above it (transformers uses `finfo.min` the same way).
fn causal_mask(seq_len: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> =
        (0..seq_len).flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::MIN } else { 0.0 })).collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)?.to_dtype(dtype)?.unsqueeze(0)?.unsqueeze(0)
}
