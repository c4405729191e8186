//! t2v: the ModelScope text-to-video latent diffusion model (diffusers' `TextToVideoSDPipeline`)
//! in Rust on candle.
//!
//! The modules follow the pipeline: [`tokenizer`] → [`text_encoder`] → [`unet3d`] iterated by
//! [`schedulers`] from [`noise`] → [`vae`] → frames → [`video`]; [`checkpoint`] finds and reads
//! checkpoint folders and [`pipeline`] runs the whole.

pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod files;
pub mod kernels;
pub mod long_video;
pub mod nn;
pub mod noise;
pub mod params;
pub mod pipeline;
pub mod profile;
pub mod schedulers;
pub mod sizing;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet3d;
pub mod vae;
pub mod video;

/// LoRAs (read and merged at load) live with the weights they change; `t2v::lora` names them too.
pub use checkpoint::lora;

pub use error::{Error, Result};
