//! Checkpoints in the diffusers layout: where a model is ([`hub`]: a local folder, or a Hugging
//! Face repo id through the hub cache), what is in it ([`ModelFolder`]: `model_index.json`, each
//! component's config, which weights files to read by [`select_weights`]), and its weights
//! ([`ComponentWeights`]: safetensors memory-mapped, or a PyTorch `.bin` read by [`pth`] without
//! executing its pickle).

mod folder;
pub mod hub;
pub mod lora;
pub mod pth;
mod select;
mod weights;

pub use folder::{ComponentConfig, ModelFolder};
pub use hub::{resolve_model, HubOptions, RepoSpec, DEFAULT_MODEL};
pub use select::{select_weights, WeightsFiles, WeightsFormat, WeightsVariant};
pub use weights::{inspect_safetensors, summarize_safetensors_header, ComponentWeights, SafetensorsSummary};
