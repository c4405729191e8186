"""Each kind of error is the Python exception a caller expects, carrying the library's message."""

import json
import os

import numpy as np
import pytest

import t2v
from conftest import FIXTURES, copy_model, model_dir, pipeline


def test_a_missing_model_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder .* diffusers layout"):
        t2v.TextToVideoSDPipeline.from_pretrained(tmp_path / "nowhere")


def test_a_repo_not_in_the_cache_offline_is_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_index.json of owner/model is not in the Hugging Face cache"):
        t2v.TextToVideoSDPipeline.from_pretrained("owner/model", local_files_only=True)


def test_missing_weights_are_file_not_found(tmp_path):
    folder = copy_model("tiny-t2v", tmp_path)
    os.remove(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="unet has no weights file"):
        t2v.TextToVideoSDPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="fp16"):
        t2v.TextToVideoSDPipeline.from_pretrained(model_dir("tiny-t2v"), variant="fp16")


def test_an_unsupported_checkpoint_is_a_value_error(tmp_path):
    folder = copy_model("tiny-t2v", tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"][1] = "UNet2DConditionModel"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unet class `UNet2DConditionModel` is not supported"):
        t2v.TextToVideoSDPipeline.from_pretrained(folder)


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    folder = copy_model("tiny-t2v", tmp_path)
    os.remove(folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes((FIXTURES / "malicious.bin").read_bytes())
    monkeypatch.chdir(tmp_path)
    pipe = t2v.TextToVideoSDPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="refusing to load .*pickle references `posix.system`"):
        pipe("a cat", num_inference_steps=1, num_frames=1)
    assert not (tmp_path / "t2v-pickle-ran.txt").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(height=60), "the height must be a positive multiple of 8 .*got 60; try 56"),
        (dict(width=12), "the width must be a positive multiple of 8"),
        (dict(num_inference_steps=0), "the number of denoising steps must be at least 1"),
        (dict(num_frames=0), "the number of frames must be at least 1"),
        (dict(guidance_scale=-1.0), "the guidance scale must be between 0 and 100 .*, got -1"),
        (dict(eta=float("nan")), "eta must be between 0 .* and 1, got NaN"),
        (dict(output_type="mp4"), "unknown output_type 'mp4'"),
        (dict(callback_steps=0), "callback_steps must be a positive integer"),
        (dict(num_frames=2.5), "num_frames must be a whole number"),
        (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), "may name 'latents' only"),
        (dict(generator=[1, 2]), "2 generators were given for 1 prompts"),
        (dict(generator=-(2**64)), r"a seed must lie in \[-2\*\*63, 2\*\*64\)"),
    ],
)
def test_bad_settings_are_value_errors(small, settings, message):
    with pytest.raises(ValueError, match=message):
        small("a cat", **settings)


def test_bad_names_are_value_errors(tiny):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        t2v.TextToVideoSDPipeline.from_pretrained(model_dir("tiny-t2v"), torch_dtype="float8")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        tiny.to("gpu")
    with pytest.raises(ValueError, match="unknown weights variant `fp8`"):
        t2v.TextToVideoSDPipeline.from_pretrained(model_dir("tiny-t2v"), variant="fp8")
    with pytest.raises(ValueError, match="give a prompt"):
        tiny()


def test_bad_scheduler_configs_are_value_errors(tiny):
    with pytest.raises(ValueError, match="unknown variant `bogus`, expected one of `leading`, `linspace`, `trailing`"):
        t2v.DDIMScheduler.from_config(tiny.scheduler.config, timestep_spacing="bogus")
    with pytest.raises(ValueError, match="unknown variant `sde`"):
        t2v.DPMSolverMultistepScheduler.from_config(tiny.scheduler.config, algorithm_type="sde")
    with pytest.raises(TypeError, match="t2v runs with DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler"):
        tiny.scheduler = "ddim"
    with pytest.raises(TypeError, match="cannot be changed"):
        tiny.scheduler.config["beta_end"] = 0.1


def test_unsupported_diffusers_arguments_say_so(tiny):
    for argument in ("latents", "prompt_embeds", "negative_prompt_embeds", "clip_skip"):
        with pytest.raises(NotImplementedError, match=f"t2v does not support {argument}"):
            tiny("a cat", **{argument: 1})
    with pytest.raises(NotImplementedError, match="cross_attention_kwargs"):
        tiny("a cat", cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(TypeError, match="cannot take torch modules"):
        t2v.TextToVideoSDPipeline.from_pretrained(model_dir("tiny-t2v"), unet=object())
    with pytest.raises(TypeError, match="from_pretrained"):
        t2v.TextToVideoSDPipeline()
    with pytest.raises(NotImplementedError, match="other latents"):
        tiny("a cat", num_inference_steps=1, num_frames=1,
             callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 2})


def test_export_errors(tmp_path):
    frames = np.zeros((2, 16, 16, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"a batch of 2 videos: pass one of them \(frames\[i\]\)"):
        t2v.export_to_video(np.stack([frames, frames]), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match=r"got the shape \(2, 16, 16\)"):
        t2v.export_to_video(frames[..., 0], tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="too small for the H.264 encoder"):
        t2v.export_to_video(frames[:, :8, :8], tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="fps must be a whole number of at least 1"):
        t2v.export_to_video(frames, tmp_path / "x.mp4", fps=0)
    with pytest.raises(ValueError, match="qp must be a whole number from 12"):
        t2v.export_to_video(frames, tmp_path / "x.mp4", qp=60)
    with pytest.raises(FileNotFoundError):
        t2v.export_to_video(frames, tmp_path / "no-such-folder" / "x.mp4")
    assert list(tmp_path.iterdir()) == [], "a failed write leaves nothing behind"
