"""diffusers' API: names, signatures and docstrings, schedulers, generators, outputs, exporters."""

import inspect
import json
import pickle
import pydoc
import re
import warnings

import numpy as np
import pytest

import t2v
from conftest import model_dir, pipeline

CALL_DEFAULTS = {
    "prompt": None, "height": None, "width": None, "num_frames": 16, "num_inference_steps": 50,
    "guidance_scale": 9.0, "negative_prompt": None, "eta": 0.0, "generator": None, "latents": None,
    "prompt_embeds": None, "negative_prompt_embeds": None, "output_type": "np", "return_dict": True,
    "callback": None, "callback_steps": 1, "cross_attention_kwargs": None, "clip_skip": None,
    "callback_on_step_end": None, "callback_on_step_end_tensor_inputs": ("latents",),
}


def test_help_lists_every_argument_and_its_default():
    parameters = inspect.signature(t2v.TextToVideoSDPipeline.__call__).parameters
    # diffusers' order, so that positional calls mean the same.
    assert list(parameters)[1:] == list(CALL_DEFAULTS)
    assert {name: p.default for name, p in parameters.items() if name != "self"} == CALL_DEFAULTS
    text = pydoc.render_doc(t2v.TextToVideoSDPipeline.__call__, renderer=pydoc.plaintext)
    signature = str(inspect.signature(t2v.TextToVideoSDPipeline.__call__))
    assert signature in text.replace("\n", "")
    for name, default in CALL_DEFAULTS.items():
        assert re.search(rf"\b{name}: [^=]*= {re.escape(repr(default))}(, |\))", signature), (name, default)
        # ... and the docstring says what each one does.
        assert f"\n        {name}: " in text, name


def test_names_of_diffusers():
    assert t2v.TextToVideoMSPipeline is t2v.TextToVideoSDPipeline
    assert issubclass(t2v.DiffusionPipeline, t2v.TextToVideoSDPipeline)
    pipe = t2v.DiffusionPipeline.from_pretrained(model_dir("tiny-t2v"))
    assert type(pipe) is t2v.TextToVideoSDPipeline
    assert pipe.config["_class_name"] == "TextToVideoSDPipeline"
    assert pipe.unet.config.sample_size == 32 and pipe.vae.config["_class_name"] == "AutoencoderKL"
    assert pipe.vae_scale_factor == 1
    assert t2v.float16 == "float16" and t2v.float32 == "float32"
    from t2v.utils import export_to_gif, export_to_video

    assert export_to_video is t2v.export_to_video and export_to_gif is t2v.export_to_gif


MEMORY_SWITCHES = [
    "enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_vae_slicing", "enable_vae_tiling",
    "enable_attention_slicing", "enable_xformers_memory_efficient_attention", "disable_model_cpu_offload",
    "disable_sequential_cpu_offload", "disable_vae_slicing", "disable_vae_tiling", "disable_attention_slicing",
    "disable_xformers_memory_efficient_attention",
]


def test_memory_switches_are_accepted_and_say_why(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no GPU in this build: stays on the CPU
        for name in MEMORY_SWITCHES:
            method = getattr(tiny, name)
            assert len(inspect.getdoc(method)) > 40, name
            assert method() is None
    tiny.unet.enable_forward_chunking(chunk_size=1, dim=1)
    tiny.vae.enable_slicing()
    assert tiny.device == "cpu"
    # ... and change nothing: the frames are the same.
    run = dict(num_inference_steps=2, num_frames=2, generator=3)
    assert np.array_equal(tiny("a cat", **run).frames, pipeline("tiny-t2v")("a cat", **run).frames)


def test_to_takes_devices_and_dtypes_as_diffusers_spells_them():
    pipe = t2v.TextToVideoSDPipeline.from_pretrained(model_dir("tiny-t2v"))
    assert pipe.to("cpu") is pipe and pipe.device == "cpu" and pipe.dtype == "float32"
    pipe.to("float16")
    assert pipe.dtype == "float16"
    pipe.to(device="cpu", dtype="float32")
    assert pipe.dtype == "float32"
    pipe.to("cpu", "torch.float16")
    assert pipe.dtype == "float16"
    if t2v._t2v.open_device("auto") == "cpu":
        # A script written for a GPU still runs, in float32 (the reference's numbers).
        with pytest.warns(RuntimeWarning, match="running on the CPU: this build of t2v has no cuda support.*"
                          "computing in float32 instead of float16"):
            pipe.to("cuda")
        assert pipe.device == "cpu" and pipe.dtype == "float32"
        with pytest.warns(RuntimeWarning, match="no metal support"):
            pipe.to("mps")


def test_schedulers_from_config():
    pipe = pipeline("tiny-t2v")
    ddim = pipe.scheduler
    assert isinstance(ddim, t2v.DDIMScheduler)
    assert ddim.config["_class_name"] == "DDIMScheduler" and ddim.config.timestep_spacing == "leading"
    dpm = t2v.DPMSolverMultistepScheduler.from_config(ddim.config)
    assert dpm.config["_class_name"] == "DPMSolverMultistepScheduler"
    assert dpm.config.beta_schedule == ddim.config.beta_schedule
    # Keyword overrides, and a scheduler in place of its config.
    sde = t2v.DPMSolverMultistepScheduler.from_config(dpm, algorithm_type="sde-dpmsolver++")
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    # As in diffusers, DPM-Solver's defaults fill the keys DDIM's config lacks (and are listed in
    # `_use_default_values`), and DDIM's own keys ride along unchanged (diffusers' "hidden"
    # config), so DDIM built back has the file's clip_sample, not DDIM's default (True).
    assert dpm.config.solver_order == 2 and dpm.config.lambda_min_clipped == float("-inf")
    assert "solver_order" in dpm.config["_use_default_values"]
    assert dpm.config["clip_sample"] is False and ddim.config.clip_sample is False
    assert t2v.DDIMScheduler.from_config(dpm.config).config.clip_sample is False
    assert t2v.DDIMScheduler.from_config(ddim.config) == ddim
    assert pickle.loads(pickle.dumps(ddim.config)) == ddim.config
    assert "DDIMScheduler" in repr(ddim)
    from_folder = t2v.DDIMScheduler.from_pretrained(model_dir("tiny-t2v"), subfolder="scheduler")
    assert from_folder == ddim
    # A scheduler changes the frames: trailing spacing gives other timesteps than leading.
    trailing = t2v.DDIMScheduler.from_config(ddim.config, timestep_spacing="trailing")
    trailing.set_timesteps(2)
    ddim.set_timesteps(2)
    assert list(trailing.timesteps) != list(ddim.timesteps)
    run = dict(num_inference_steps=2, num_frames=2, generator=3)
    before = pipe("a cat", **run).frames
    pipe.scheduler = trailing
    assert not np.array_equal(pipe("a cat", **run).frames, before)


class DiffusersLikeScheduler:
    """Stands in for a diffusers scheduler object (same class name, a config mapping)."""

    def __init__(self, config):
        self.config = config


def test_a_diffusers_scheduler_is_taken_over():
    pipe = pipeline("tiny-t2v")
    config = dict(pipe.scheduler.config, _class_name="DPMSolverMultistepScheduler")
    stand_in = type("DPMSolverMultistepScheduler", (DiffusersLikeScheduler,), {})(config)
    pipe.scheduler = stand_in
    assert isinstance(pipe.scheduler, t2v.DPMSolverMultistepScheduler)


def test_generators():
    g = t2v.Generator("cpu")
    assert g.initial_seed() == 67280421310721  # torch's default seed
    assert g.manual_seed(42) is g and g.initial_seed() == 42
    assert t2v.Generator().manual_seed(-1).initial_seed() == 2**64 - 1
    pipe = pipeline("tiny-t2v")
    run = dict(num_inference_steps=2, num_frames=2)
    a = pipe("a cat", generator=g, **run)
    with pytest.warns(UserWarning, match="already used by a run"):
        b = pipe("a cat", generator=g, **run)
    assert a.seeds == b.seeds == [42] and np.array_equal(a.frames, b.frames)
    assert np.array_equal(pipe("a cat", generator=42, **run).frames, a.frames)
    c = pipe("a cat", **run)
    assert len(c.seeds) == 1 and not np.array_equal(c.frames, a.frames)
    assert np.array_equal(pipe("a cat", generator=c.seeds[0], **run).frames, c.frames)


class _TorchGeneratorStandIn:
    """What t2v reads of a ``torch.Generator`` (its ``device`` and ``initial_seed()``), for
    machines without torch (CI installs no torch: its wheels are gigabytes)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._seed = 67280421310721

    def manual_seed(self, seed: int):
        self._seed = seed
        return self

    def initial_seed(self) -> int:
        return self._seed


def _torch_generator(device: str = "cpu"):
    try:
        import torch
    except ImportError:
        return _TorchGeneratorStandIn(device)
    return torch.Generator(device)


def test_a_torch_generator_gives_its_initial_seed():
    pipe = pipeline("tiny-t2v")
    run = dict(num_inference_steps=2, num_frames=2)
    frames = pipe("a cat", generator=_torch_generator("cpu").manual_seed(9), **run).frames
    assert np.array_equal(frames, pipe("a cat", generator=9, **run).frames)


def test_batches_of_prompts_are_videos_one_by_one(tiny):
    run = dict(num_inference_steps=2, num_frames=2)
    out = tiny(["a cat", "a dog"], negative_prompt=["blurry", None], generator=[t2v.Generator().manual_seed(1), 2], **run)
    assert out.frames.shape == (2, 2, 32, 32, 3) and out.seeds == [1, 2]
    assert np.array_equal(out.frames[0], tiny("a cat", negative_prompt="blurry", generator=1, **run).frames[0])
    assert np.array_equal(out.frames[1], tiny("a dog", generator=2, **run).frames[0])


def test_output_types(tiny):
    run = dict(num_inference_steps=2, num_frames=2, generator=5)
    frames = tiny("a cat", **run).frames
    (same,) = tiny("a cat", return_dict=False, **run)
    assert np.array_equal(same, frames)
    out = tiny("a cat", **run)
    assert out[0] is out.frames and out["frames"] is out.frames and out.to_tuple() == (out.frames,)
    latents = tiny("a cat", output_type="latent", **run).frames
    assert latents.shape == (1, 4, 2, 32, 32) and latents.dtype == np.float32


def test_pil_output():
    pytest.importorskip("PIL")
    tiny = pipeline("tiny-t2v")
    run = dict(num_inference_steps=2, num_frames=2, generator=5)
    images = tiny("a cat", output_type="pil", **run).frames
    frames = tiny("a cat", **run).frames
    assert len(images) == 1 and len(images[0]) == 2 and images[0][0].size == (32, 32)
    assert np.array_equal(np.asarray(images[0][1]), (frames[0, 1] * 255).round().astype(np.uint8))


def test_export_to_video_and_gif(tmp_path):
    frames = np.random.default_rng(0).random((3, 32, 48, 3), dtype=np.float32)
    path = t2v.export_to_video(frames)
    try:
        data = open(path, "rb").read()
        assert path.endswith(".mp4") and data[4:8] == b"ftyp"
    finally:
        import os

        os.remove(path)
    # A batch of one (what pipe(...).frames is), frames[0] and a list of frames write the same file.
    written = []
    for i, given in enumerate([frames[None], frames, list(frames)]):
        written.append(open(t2v.export_to_video(given, tmp_path / f"{i}.mp4", fps=8), "rb").read())
    assert all(w == written[0] for w in written)
    # uint8 frames (as imageio takes them) too; the encoder converts floats to YUV without
    # rounding to 8-bit RGB first, so these differ a little.
    pixels = (frames * 255).round().astype(np.uint8)
    assert open(t2v.export_to_video(pixels, tmp_path / "u8.mp4"), "rb").read()[4:8] == b"ftyp"
    gif = t2v.export_to_gif(frames, tmp_path / "a.gif", fps=4)
    assert open(gif, "rb").read()[:6] == b"GIF89a"
    with pytest.warns(UserWarning, match="t2v ignores quality"):
        t2v.export_to_video(frames, tmp_path / "q.mp4", quality=5.0)
    lower = t2v.export_to_video(frames, tmp_path / "qp40.mp4", qp=40)
    assert len(open(lower, "rb").read()) < len(written[0])


def test_pil_frames_export():
    PIL = pytest.importorskip("PIL.Image")
    frames = (np.random.default_rng(1).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    images = [PIL.fromarray(f) for f in frames]
    assert open(t2v.export_to_gif(images), "rb").read() == open(t2v.export_to_gif(frames), "rb").read()


def test_config_is_json_of_the_checkpoint():
    pipe = pipeline("small-t2v")
    on_disk = json.loads((model_dir("small-t2v") / "scheduler" / "scheduler_config.json").read_text())
    assert dict(pipe.scheduler.config) == on_disk


def test_signature_defaults_are_the_librarys():
    """The pipelines' defaults come from one source: the library's recipe, except where diffusers'
    own signature differs on purpose (scripts written for diffusers must behave as there): its 50
    steps, and video-to-video's guidance 15."""
    import inspect

    library = t2v._t2v.library_defaults()
    text = inspect.signature(t2v.TextToVideoSDPipeline.__call__).parameters
    assert text["num_frames"].default == library["num_frames"]
    assert text["guidance_scale"].default == library["guidance_scale"]
    assert text["num_inference_steps"].default == 50 != library["num_inference_steps"]
    video = inspect.signature(t2v.VideoToVideoSDPipeline.__call__).parameters
    assert video["strength"].default == library["strength"]
    assert video["guidance_scale"].default == 15.0
    export = inspect.signature(t2v.export_to_video).parameters
    assert export["fps"].default == library["fps"]
