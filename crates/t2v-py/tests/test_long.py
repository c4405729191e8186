"""Long videos through the Python API as diffusers' FreeNoise spells it: the fixtures' `long/`
runs (FreeNoise's windows and shuffled noise, prompt travel) within 1e-3 of the reference frames."""

import json

import numpy as np
import pytest

import t2v
from conftest import max_abs, model_dir, pipeline


def long_reference(model: str):
    from safetensors.numpy import load_file

    folder = model_dir(model) / "long"
    return json.loads((folder / "long_reference.json").read_text()), load_file(str(folder / "long_reference.safetensors"))


def run_long(pipe: t2v.TextToVideoSDPipeline, run: dict) -> np.ndarray:
    if run["scheduler"] == "dpm":
        pipe.scheduler = t2v.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.enable_free_noise(
        context_length=run["context_length"],
        context_stride=run["context_stride"],
        weighting_scheme=run.get("weighting_scheme", "pyramid"),
        noise_type="shuffle_context",
    )
    try:
        prompt = {int(k): v for k, v in run["prompts"].items()} if "prompts" in run else run["prompt"]
        negative = run.get("negative_prompts", run.get("negative_prompt"))
        if isinstance(negative, dict):
            negative = {int(k): v for k, v in negative.items()}
        out = pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=run["steps"],
            guidance_scale=run["guidance_scale"],
            eta=run.get("eta", 0.0),
            num_frames=run["num_frames"],
            height=run["height"],
            width=run["width"],
            generator=t2v.Generator("cpu").manual_seed(run["seed"]),
        )
    finally:
        pipe.disable_free_noise()
    return out.frames


@pytest.mark.parametrize("model", ["tiny-t2v", "small-t2v"])
def test_long_reference_runs(model):
    runs, refs = long_reference(model)
    for i, run in enumerate(runs["runs"]):
        pipe = pipeline(model)  # the checkpoint's scheduler again
        frames = run_long(pipe, run)
        expected = refs[run["frames_key"]]
        assert frames.shape == (1,) + expected.shape
        err = max_abs(frames[0], expected)
        print(f"{model} long run {i}: frames max abs err {err:.2e}")
        assert err <= 1e-3, f"{model} long run {i}: frames differ by {err:.2e}"
    assert not pipe.free_noise_enabled


def test_free_noise_settings_are_checked(tiny):
    with pytest.raises(ValueError, match="weighting_scheme"):
        tiny.enable_free_noise(weighting_scheme="triangle")
    with pytest.raises(NotImplementedError, match="shuffle_context"):
        tiny.enable_free_noise(noise_type="random")
    tiny.enable_free_noise(context_length=12, context_stride=4)
    try:
        with pytest.raises(ValueError, match="longer than the video"):
            tiny("waves", num_frames=8, num_inference_steps=1, height=32, width=32)
    finally:
        tiny.disable_free_noise()
    with pytest.raises(ValueError, match="must be 0"):
        tiny({4: "waves"}, num_frames=8, num_inference_steps=1, height=32, width=32)
    with pytest.raises(ValueError, match="past the last frame"):
        tiny({0: "waves", 8: "sand"}, num_frames=8, num_inference_steps=1, height=32, width=32)
