//! The UNet's `nn.Linear`, `nn.Conv2d` and `nn.Conv3d` modules in the order PyTorch's
//! `named_modules()` visits them in diffusers' `UNet3DConditionModel`: the order in which the
//! key-less LoRA lists of Text-To-Video-Finetuning and T2V-Turbo (`[up0, down0, up1, down1, …]`)
//! name their modules (their `inject_trainable_lora_extended` walks `named_modules()` of the
//! whole UNet and takes every module whose class is exactly one of the three).
//!
//! `named_modules()` visits submodules in the order `__init__` registers them, depth first:
//! `conv_in`, `time_embedding` (`linear_1`, `cond_proj`, `linear_2`), `transformer_in`,
//! `down_blocks`, then `up_blocks` (registered as an empty list before `mid_block`, filled
//! after it), `mid_block`, `conv_out`. Within a block, each list whole before the next:
//! `resnets`, `temp_convs`, `attentions`, `temp_attentions`, then the down/up sampler.

use super::Config;

/// Module paths (without `.weight`), in `named_modules()` order; a ResNet has a `conv_shortcut`
/// when its input and output channels differ (diffusers' `use_in_shortcut`).
pub fn lora_module_order(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let levels = cfg.block_out_channels.len();
    let ch = &cfg.block_out_channels;
    let layers = cfg.layers_per_block;
    out.push("conv_in".to_string());
    out.push("time_embedding.linear_1".to_string());
    if cfg.time_cond_proj_dim.is_some() {
        out.push("time_embedding.cond_proj".to_string());
    }
    out.push("time_embedding.linear_2".to_string());
    transformer(&mut out, "transformer_in");

    let mut out_ch = ch[0];
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let p = format!("down_blocks.{i}");
        let in_ch = out_ch;
        out_ch = ch[i];
        for j in 0..layers {
            let res_in = if j == 0 { in_ch } else { out_ch };
            resnet(&mut out, &format!("{p}.resnets.{j}"), res_in != out_ch);
        }
        temp_convs(&mut out, &p, layers);
        if kind == "CrossAttnDownBlock3D" {
            attentions(&mut out, &p, layers);
        }
        if i + 1 < levels {
            out.push(format!("{p}.downsamplers.0.conv"));
        }
    }

    let reversed: Vec<usize> = ch.iter().rev().copied().collect();
    let mut out_ch = reversed[0];
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let p = format!("up_blocks.{i}");
        let prev_out = out_ch;
        out_ch = reversed[i];
        let in_ch = reversed[(i + 1).min(levels - 1)];
        let n = layers + 1;
        for j in 0..n {
            let skip = if j == n - 1 { in_ch } else { out_ch };
            let res_in = if j == 0 { prev_out } else { out_ch };
            resnet(&mut out, &format!("{p}.resnets.{j}"), res_in + skip != out_ch);
        }
        temp_convs(&mut out, &p, n);
        if kind == "CrossAttnUpBlock3D" {
            attentions(&mut out, &p, n);
        }
        if i + 1 < levels {
            out.push(format!("{p}.upsamplers.0.conv"));
        }
    }

    resnet(&mut out, "mid_block.resnets.0", false);
    resnet(&mut out, "mid_block.resnets.1", false);
    temp_convs(&mut out, "mid_block", 2);
    attentions(&mut out, "mid_block", 1);
    out.push("conv_out".to_string());
    out
}

/// `ResnetBlock2D`: conv1, time_emb_proj, conv2[, conv_shortcut].
fn resnet(out: &mut Vec<String>, p: &str, shortcut: bool) {
    for m in ["conv1", "time_emb_proj", "conv2"] {
        out.push(format!("{p}.{m}"));
    }
    if shortcut {
        out.push(format!("{p}.conv_shortcut"));
    }
}

/// `TemporalConvLayer`s: four `Sequential`s whose Conv3d is item 2 of the first, 3 of the rest.
fn temp_convs(out: &mut Vec<String>, p: &str, n: usize) {
    for j in 0..n {
        for m in ["conv1.2", "conv2.3", "conv3.3", "conv4.3"] {
            out.push(format!("{p}.temp_convs.{j}.{m}"));
        }
    }
}

/// The spatial transformers of a block, then its temporal ones.
fn attentions(out: &mut Vec<String>, p: &str, n: usize) {
    for j in 0..n {
        transformer(out, &format!("{p}.attentions.{j}"));
    }
    for j in 0..n {
        transformer(out, &format!("{p}.temp_attentions.{j}"));
    }
}

/// `Transformer2DModel` (linear projections) or `TransformerTemporalModel`: proj_in, one
/// `BasicTransformerBlock` (attn1, attn2, feed-forward), proj_out.
fn transformer(out: &mut Vec<String>, p: &str) {
    out.push(format!("{p}.proj_in"));
    let b = format!("{p}.transformer_blocks.0");
    for attn in ["attn1", "attn2"] {
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            out.push(format!("{b}.{attn}.{m}"));
        }
    }
    out.push(format!("{b}.ff.net.0.proj"));
    out.push(format!("{b}.ff.net.2"));
    out.push(format!("{p}.proj_out"));
}

/// The original ModelScope (and webui) name of a diffusers UNet module, as the Stable LoRA files
/// of Text-To-Video-Finetuning name their keys: diffusers'
/// `scripts/convert_ms_text_to_video_to_diffusers.py` mapping (the inverse of the one
/// Text-To-Video-Finetuning's `convert_unet_state_dict` applies), generalised from the 1.7B
/// model's 4 levels of 2 layers to any config. ModelScope numbers `input_blocks` and
/// `output_blocks` consecutively, one per layer plus one per down/up sampler, and nests each
/// layer's parts: `.0` the ResNet (`in_layers.2` = conv1, `out_layers.3` = conv2,
/// `emb_layers.1` = time_emb_proj, `skip_connection` = conv_shortcut) with its temporal
/// convolution under `.0.temopral_conv` (sic), `.1` the spatial transformer, `.2` the temporal
/// one. Modules it does not rename (`conv_in`, `time_embedding`, `conv_out`: their LoRA keys
/// have no `.weight` for the converter to match) keep their diffusers name.
pub fn modelscope_name(cfg: &Config, module: &str) -> String {
    let per_level = cfg.layers_per_block + 1;
    let resnet_part = |rest: &str| -> String {
        for (hf, ms) in [
            ("conv1", "in_layers.2"),
            ("conv2", "out_layers.3"),
            ("time_emb_proj", "emb_layers.1"),
            ("conv_shortcut", "skip_connection"),
        ] {
            if rest == hf {
                return ms.to_string();
            }
        }
        rest.to_string()
    };
    let parts: Vec<&str> = module.splitn(5, '.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    if let Some(rest) = module.strip_prefix("transformer_in.") {
        return format!("input_blocks.0.1.{rest}");
    }
    match parts.as_slice() {
        ["down_blocks", i, kind, j, rest] => {
            let (Some(i), Some(j)) = (num(i), num(j)) else { return module.to_string() };
            let block = 1 + i * per_level + j;
            match *kind {
                "resnets" => format!("input_blocks.{block}.0.{}", resnet_part(rest)),
                "temp_convs" => format!("input_blocks.{block}.0.temopral_conv.{rest}"),
                "attentions" => format!("input_blocks.{block}.1.{rest}"),
                "temp_attentions" => format!("input_blocks.{block}.2.{rest}"),
                // downsamplers.0.conv → input_blocks.<n>.op
                "downsamplers" if *rest == "conv" => format!("input_blocks.{}.op", (i + 1) * per_level),
                _ => module.to_string(),
            }
        }
        ["up_blocks", i, kind, j, rest] => {
            let (Some(i), Some(j)) = (num(i), num(j)) else { return module.to_string() };
            let block = i * per_level + j;
            match *kind {
                "resnets" => format!("output_blocks.{block}.0.{}", resnet_part(rest)),
                "temp_convs" => format!("output_blocks.{block}.0.temopral_conv.{rest}"),
                "attentions" => format!("output_blocks.{block}.1.{rest}"),
                "temp_attentions" => format!("output_blocks.{block}.2.{rest}"),
                "upsamplers" => {
                    let with_attention = cfg.up_block_types.get(i).is_some_and(|t| t == "CrossAttnUpBlock3D");
                    let slot = if with_attention { 3 } else { 1 };
                    format!("output_blocks.{}.{slot}.{rest}", i * per_level + cfg.layers_per_block)
                }
                _ => module.to_string(),
            }
        }
        ["mid_block", kind, j, rest @ ..] => {
            let Some(j) = num(j) else { return module.to_string() };
            let rest = rest.join(".");
            match *kind {
                "resnets" => format!("middle_block.{}.{}", 3 * j, resnet_part(&rest)),
                "temp_convs" => format!("middle_block.{}.temopral_conv.{rest}", 3 * j),
                "attentions" => format!("middle_block.1.{rest}"),
                "temp_attentions" => format!("middle_block.2.{rest}"),
                _ => module.to_string(),
            }
        }
        _ => module.to_string(),
    }
}
