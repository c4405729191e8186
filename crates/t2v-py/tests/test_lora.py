"""LoRAs and the few-step schedulers through the Python API, as diffusers spells them: the
`lora/` fixtures' reference runs (frames within 1e-3, timesteps exact)."""

import json

import numpy as np
import pytest

import t2v
from conftest import max_abs, model_dir

SCHEDULERS = {
    "dpm": t2v.DPMSolverMultistepScheduler,
    "ddim": t2v.DDIMScheduler,
    "lcm": t2v.LCMScheduler,
    "unipc": t2v.UniPCMultistepScheduler,
    "euler_a": t2v.EulerAncestralDiscreteScheduler,
}


def lora_reference(model: str):
    from safetensors.numpy import load_file

    folder = model_dir(model) / "lora"
    return json.loads((folder / "lora_reference.json").read_text()), load_file(str(folder / "lora_reference.safetensors"))


@pytest.mark.parametrize("model", ["tiny-t2v"])
def test_lora_and_scheduler_runs(model):
    runs, refs = lora_reference(model)
    pipe = t2v.TextToVideoSDPipeline.from_pretrained(model_dir(model))
    pipe.set_progress_bar_config(disable=True)
    checkpoint_scheduler = pipe.scheduler
    pipe.load_lora_weights(model_dir(model) / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="fixture")
    assert pipe.get_active_adapters() == ["fixture"]
    for i, run in enumerate(runs["runs"]):
        cls = SCHEDULERS[run["scheduler"]]
        pipe.scheduler = cls.from_config(checkpoint_scheduler.config, **run.get("scheduler_overrides", {}))
        pipe.scheduler.set_timesteps(run["steps"])
        np.testing.assert_array_equal(pipe.scheduler.timesteps, refs[run["timesteps_key"]].astype(pipe.scheduler.timesteps.dtype))
        weight = run.get("lora_weight")
        if weight is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(["fixture"], adapter_weights=[weight])
        frames = pipe(
            run["prompt"],
            negative_prompt=run.get("negative_prompt"),
            num_inference_steps=run["steps"],
            guidance_scale=run["guidance_scale"],
            num_frames=run["num_frames"],
            height=run["height"],
            width=run["width"],
            generator=t2v.Generator("cpu").manual_seed(run["seed"]),
        ).frames
        err = max_abs(frames[0], refs[run["frames_key"]])
        print(f"python {model} lora run {i} ({run['scheduler']}): frames max abs err {err:.2e}")
        assert err <= 1e-3, f"run {i}: {err:.2e}"


def test_fuse_scale_and_unload(tiny):
    runs, refs = lora_reference("tiny-t2v")
    run = runs["runs"][1]  # DDIM, LoRA weight 0.6
    pipe = t2v.TextToVideoSDPipeline.from_pretrained(model_dir("tiny-t2v"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(model_dir("tiny-t2v") / "lora" / "pytorch_lora_weights.safetensors")
    pipe.fuse_lora(lora_scale=run["lora_weight"])
    kwargs = dict(
        negative_prompt=run["negative_prompt"],
        num_inference_steps=run["steps"],
        guidance_scale=run["guidance_scale"],
        num_frames=run["num_frames"],
        height=run["height"],
        width=run["width"],
    )
    frames = pipe(run["prompt"], generator=t2v.Generator("cpu").manual_seed(run["seed"]), **kwargs).frames
    assert max_abs(frames[0], refs[run["frames_key"]]) <= 1e-3
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    plain = pipe(run["prompt"], generator=t2v.Generator("cpu").manual_seed(run["seed"]), **kwargs).frames
    assert max_abs(plain[0], refs[run["frames_key"]]) > 1e-2


def test_a_lora_for_another_model_is_refused(tiny):
    with pytest.raises(ValueError, match="lora_A.weight"):
        tiny.load_lora_weights(model_dir("small-t2v") / "lora" / "pytorch_lora_weights.safetensors")
    with pytest.raises(FileNotFoundError):
        tiny.load_lora_weights(model_dir("tiny-t2v") / "lora" / "missing.safetensors")
    with pytest.raises(ValueError, match="no adapter named"):
        tiny.set_adapters(["nope"])
