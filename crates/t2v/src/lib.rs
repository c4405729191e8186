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

/// Internals that the crate's own integration tests (`tests/internals.rs`) check directly; not
/// part of the API. Checked there rather than in unit tests so that `cargo test` does not compile
/// the whole crate a second time in test mode (about three CPU-minutes of every cold CI run).
#[doc(hidden)]
pub mod __internals {
    pub mod pickle {
        pub use crate::checkpoint::pth::pickle::{validate_pickle, Problem};
    }
    pub mod schedulers {
        pub use crate::schedulers::{
            alphas_cumprod, np_arange_f64, np_linspace, parse_scheduler_config, threshold_sample, BetaConfig,
            BetaSchedule,
        };
    }
    pub mod long_video {
        pub use crate::long_video::*;
    }
    pub mod video_input {
        pub use crate::video::input::*;
    }
    pub mod images {
        pub use crate::video::input::images::natural_cmp;
    }
    pub mod h264 {
        pub use crate::video::input::h264::declared_samples;
    }
    pub mod atomic {
        pub use crate::video::atomic::{temporary_owner, SetAside};
    }
    pub mod tuning {
        pub use crate::kernels::tuning::*;
    }
    pub mod params {
        pub use crate::params::*;
    }
}
