"""The fixtures' reference runs (diffusers' TextToVideoSDPipeline on random-weight models) through
the Python API: frames within 1e-3 (the fixtures' README), timesteps exact."""

import numpy as np
import pytest

import t2v
from conftest import max_abs, pipeline, reference, reference_json


def run_reference(pipe: t2v.TextToVideoSDPipeline, run: dict, **kwargs) -> np.ndarray:
    if run["scheduler"] == "dpm":
        pipe.scheduler = t2v.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(
        run["prompt"],
        negative_prompt=run.get("negative_prompt"),
        num_inference_steps=run["steps"],
        guidance_scale=run["guidance_scale"],
        num_frames=run["num_frames"],
        height=run["height"],
        width=run["width"],
        generator=t2v.Generator("cpu").manual_seed(run["seed"]),
        **kwargs,
    )
    assert out.seeds == [run["seed"]]
    return out.frames


@pytest.mark.parametrize("model", ["tiny-t2v", "small-t2v"])
def test_reference_runs(model):
    refs = reference(model)
    for i, run in enumerate(reference_json(model)["runs"]):
        frames = run_reference(pipeline(model), run)
        expected = refs[run["frames_key"]]
        assert frames.dtype == np.float32
        assert frames.shape == (1,) + expected.shape
        err = max_abs(frames[0], expected)
        print(f"{model} run {i} ({run['scheduler']}): frames max abs err {err:.2e}")
        assert err <= 1e-3, f"{model} run {i}: frames differ by {err:.2e}"
        assert frames.min() >= 0.0 and frames.max() <= 1.0
        assert frames[0, 0].max() - frames[0, 0].min() > 0.05, "a flat frame"


@pytest.mark.parametrize("model", ["tiny-t2v", "small-t2v"])
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_scheduler_timesteps_match_the_reference(model, kind):
    refs = reference(model)
    base = pipeline(model).scheduler
    scheduler = base if kind == "ddim" else t2v.DPMSolverMultistepScheduler.from_config(base.config)
    checked = 0
    for key, expected in refs.items():
        prefix = f"sched.{kind}."
        if key.startswith(prefix) and key.endswith(".timesteps"):
            n = int(key[len(prefix) : -len(".timesteps")])
            scheduler.set_timesteps(n)
            assert scheduler.num_inference_steps == n
            assert scheduler.timesteps.dtype == np.int64
            np.testing.assert_array_equal(scheduler.timesteps, expected.astype(np.int64))
            checked += 1
    assert checked > 0


def test_float16_stays_near_the_reference():
    # The library's measure: f16 frames (float16 weights, float32 activations, float16 products
    # where the CPU has AVX512_FP16) within 2.2e-3 of the f32 reference on tiny-t2v.
    pipe = t2v.TextToVideoSDPipeline.from_pretrained(pipeline("tiny-t2v")._root, torch_dtype="float16")
    assert pipe.dtype == "float16"
    run = reference_json("tiny-t2v")["runs"][0]
    frames = run_reference(pipe, run)
    err = max_abs(frames[0], reference("tiny-t2v")[run["frames_key"]])
    print(f"tiny-t2v f16: frames max abs err {err:.2e}")
    assert 0 < err <= 1e-2
