"""VideoToVideoSDPipeline: the fixtures' video-to-video references (diffusers' VideoToVideoSDPipeline
fed the input clips as PIL images) within 1e-3, frames bit-equal to the command line's for the same
settings and input, the input forms diffusers takes, Ctrl-C, and the errors."""

import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import t2v
from conftest import max_abs, model_dir, run_cli

_V2V: dict = {}


def v2v_pipe(name: str) -> t2v.VideoToVideoSDPipeline:
    """One loaded pipeline per fixture model, its scheduler reset to the checkpoint's."""
    if name not in _V2V:
        pipe = t2v.VideoToVideoSDPipeline.from_pretrained(model_dir(name))
        _V2V[name] = (pipe, pipe.scheduler)
    pipe, checkpoint_scheduler = _V2V[name]
    pipe.scheduler = checkpoint_scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def v2v_runs(name: str) -> list:
    return json.loads((model_dir(name) / "v2v" / "v2v_reference.json").read_text())["runs"]


def v2v_reference(name: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir(name) / "v2v" / "v2v_reference.safetensors"))


def png_frames(name: str, run: dict) -> list:
    """The run's input clip as the reference read it: the PNG frames, in order, as PIL images."""
    folder = model_dir(name) / run["input_png"]
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def run_v2v(pipe: t2v.VideoToVideoSDPipeline, run: dict, video, **kwargs):
    if run["scheduler"] == "dpm":
        pipe.scheduler = t2v.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe(
        run["prompt"],
        video=video,
        strength=run["strength"],
        negative_prompt=run.get("negative_prompt"),
        num_inference_steps=run["steps"],
        guidance_scale=run["guidance_scale"],
        eta=run.get("eta", 0.0),
        generator=t2v.Generator("cpu").manual_seed(run["seed"]),
        **kwargs,
    )


@pytest.mark.parametrize("model", ["tiny-t2v", "small-t2v"])
def test_reference_runs(model):
    refs = v2v_reference(model)
    for i, run in enumerate(v2v_runs(model)):
        out = run_v2v(v2v_pipe(model), run, png_frames(model, run))
        expected = refs[run["frames_key"]]
        assert out.seeds == [run["seed"]]
        assert out.frames.dtype == np.float32
        assert out.frames.shape == (1,) + expected.shape == (1, run["num_frames"], run["height"], run["width"], 3)
        err = max_abs(out.frames[0], expected)
        print(f"{model} v2v run {i} ({run['scheduler']}, strength {run['strength']}): frames max abs err {err:.2e}")
        assert err <= 1e-3, f"{model} v2v run {i}: frames differ by {err:.2e}"


def test_input_forms_give_the_same_frames():
    """PIL images, uint8 frames, a uint8 (F, H, W, 3) array, floats in [0, 1] and a batch of one
    are the same video to diffusers' preprocessing; so they are to t2v."""
    run = v2v_runs("tiny-t2v")[1]
    pipe = v2v_pipe("tiny-t2v")
    pil = png_frames("tiny-t2v", run)
    pixels = np.stack([np.asarray(im) for im in pil])
    assert np.array_equal(pixels, v2v_reference("tiny-t2v")["v2v.1.input"]), "the PNGs are the reference's input"
    expected = run_v2v(pipe, run, pil).frames
    for form in (list(pixels), pixels, pixels[None], pixels.astype(np.float32) / np.float32(255)):
        assert np.array_equal(run_v2v(pipe, run, form).frames, expected)
    # Floats in [-1, 1] are taken as already normalised, as diffusers does (with its FutureWarning).
    with pytest.warns(FutureWarning):
        normalised = run_v2v(pipe, run, np.float32(2) * (pixels.astype(np.float32) / np.float32(255)) - np.float32(1))
    assert np.array_equal(normalised.frames, expected)


def cli_args(run: dict, video: Path) -> list:
    args = ["generate", run["prompt"], "-m", str(model_dir("tiny-t2v")), "--video", str(video),
            "--strength", str(run["strength"]), "--seed", str(run["seed"]), "--steps", str(run["steps"]),
            "-g", str(run["guidance_scale"]), "--scheduler", run["scheduler"], "--eta", str(run.get("eta", 0.0)),
            "--device", "cpu", "-q", "-o", "cli.npy"]
    if run.get("negative_prompt") is not None:
        args += ["-n", run["negative_prompt"]]
    return args


@pytest.mark.parametrize("i", [0, 1, 3])
def test_frames_are_bit_equal_to_the_command_line(t2v_bin, tmp_path, i):
    run = v2v_runs("tiny-t2v")[i]
    run_cli(t2v_bin, *cli_args(run, model_dir("tiny-t2v") / run["input_png"]), cwd=tmp_path)
    expected = np.load(tmp_path / "cli.npy")
    frames = run_v2v(v2v_pipe("tiny-t2v"), run, png_frames("tiny-t2v", run)).frames[0]
    assert frames.shape == expected.shape == (run["num_frames"], 32, 32, 3)
    assert np.array_equal(frames, expected), f"max abs diff {np.abs(frames - expected).max():.3e}"


def test_load_video_reads_the_mp4_as_the_command_line_does(t2v_bin, tmp_path):
    run = v2v_runs("tiny-t2v")[0]
    mp4 = model_dir("tiny-t2v") / run["input_mp4"]
    video = t2v.load_video(mp4)
    assert len(video) == run["num_frames"] and video[0].size == (32, 32) and video[0].mode == "RGB"
    # Lossy (H.264), but near the lossless frames.
    decoded = np.stack([np.asarray(im) for im in video]).astype(np.float64)
    lossless = np.stack([np.asarray(im) for im in png_frames("tiny-t2v", run)]).astype(np.float64)
    assert 0 < np.abs(decoded - lossless).mean() < 8
    assert t2v.utils.load_video(mp4, convert_method=lambda frames: frames[:2])[1].tobytes() == video[1].tobytes()

    run_cli(t2v_bin, *cli_args(run, mp4), cwd=tmp_path)
    frames = run_v2v(v2v_pipe("tiny-t2v"), run, video).frames[0]
    assert np.array_equal(frames, np.load(tmp_path / "cli.npy"))


def test_from_pipe_shares_the_weights_and_batches():
    t2v_pipe = t2v.TextToVideoSDPipeline.from_pretrained(model_dir("tiny-t2v"))
    t2v_pipe.set_progress_bar_config(disable=True)
    v2v = t2v.VideoToVideoSDPipeline.from_pipe(t2v_pipe)
    assert isinstance(v2v, t2v.VideoToVideoSDPipeline) and not isinstance(v2v, t2v.TextToVideoSDPipeline)
    assert v2v._model is t2v_pipe._model
    assert repr(v2v).startswith("VideoToVideoSDPipeline(")
    clip = t2v_pipe("a cat", num_inference_steps=2, num_frames=3, generator=1).frames[0]
    # One video for two prompts; each prompt its own seed, as in text-to-video.
    out = v2v(["a cat", "a dog"], video=clip, strength=0.5, num_inference_steps=4, generator=[3, 4])
    assert out.frames.shape == (2, 3, 32, 32, 3) and out.seeds == [3, 4]
    alone = v2v("a dog", video=clip, strength=0.5, num_inference_steps=4, generator=4).frames
    assert np.array_equal(out.frames[1], alone[0])
    # Steps that run: int(4 x 0.5) = 2, reported to the callback from 0.
    steps = []
    v2v("a cat", video=clip, strength=0.5, num_inference_steps=4, generator=3,
        callback=lambda step, t, latents: steps.append((step, latents.shape)))
    assert steps == [(0, (1, 4, 3, 32, 32)), (1, (1, 4, 3, 32, 32))]
    latents = v2v("a cat", video=clip, strength=0.5, num_inference_steps=4, output_type="latent").frames
    assert latents.shape == (1, 4, 3, 32, 32)


def test_ctrl_c_stops_within_one_step(ctrl_c):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    pipe = v2v_pipe("small-t2v")
    clip = np.random.default_rng(0).random((8, 64, 64, 3), dtype=np.float32)
    steps, sent_after, first_step = [], [], threading.Event()

    def interrupt():
        first_step.wait(60)
        time.sleep(0.05)
        sent_after.append(len(steps))
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        pipe("a cat", video=clip, strength=1.0, num_inference_steps=50,
             callback=lambda step, t, latents: (steps.append(step), first_step.set()))
    thread.join()
    assert len(steps) <= sent_after[0] + 1, (steps, sent_after)
    assert len(steps) < 50


def test_errors():
    pipe = v2v_pipe("tiny-t2v")
    clip = np.zeros((2, 32, 32, 3), dtype=np.float32)

    def fails(match, **kwargs):
        args = dict(video=clip, num_inference_steps=10)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            pipe("a cat", **args)

    fails(r"strength should in \[0.0, 1.0\] but is 1.5", strength=1.5)
    fails(r"strength should in", strength=-0.1)
    fails("runs no denoising step", strength=0.05)
    fails("give the video", video=None)
    fails("no frames", video=[])
    fails("no frames", video=np.zeros((0, 32, 32, 3), dtype=np.float32))
    fails(r"\(frames, height, width, 3\)", video=np.zeros((2, 32, 32, 4), dtype=np.float32))
    fails(r"\(frames, height, width, 3\)", video=np.zeros((32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        v2v_pipe("small-t2v")("a cat", video=np.zeros((2, 60, 64, 3), dtype=np.float32), num_inference_steps=2)
    fails("one size", video=[np.zeros((32, 32, 3), np.uint8), np.zeros((40, 32, 3), np.uint8)])
    fails("uint8", video=np.zeros((2, 32, 32, 3), dtype=np.int32))
    fails("RGB", video=[Image.new("RGBA", (32, 32))])
    with pytest.raises(ValueError, match="2 videos for 3 prompts"):
        pipe(["a", "b", "c"], video=np.zeros((2, 2, 32, 32, 3), np.float32), num_inference_steps=2)
    with pytest.raises(ValueError, match="PIL images or numpy"):
        pipe("a cat", video="clip.mp4", num_inference_steps=2)
    with pytest.raises(NotImplementedError):
        pipe("a cat", video=clip, latents=np.zeros(1))
    with pytest.raises(ValueError, match="does not download"):
        t2v.load_video("https://example.org/clip.mp4")
    with pytest.raises(FileNotFoundError):
        t2v.load_video("no-such-clip.mp4")
    with pytest.raises(TypeError, match="from_pipe"):
        t2v.VideoToVideoSDPipeline.from_pipe(object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Nothing ran: the pipeline still works, silently.
        assert pipe("a cat", video=clip, strength=0.5, num_inference_steps=2).frames.shape == (1, 2, 32, 32, 3)


def test_upscale_on_a_first_pass_is_the_command_lines_two_passes(t2v_bin, tmp_path):
    """zeroscope's recipe from Python (generate, drop the model, video-to-video at another size with
    height/width) gives the frames of `t2v generate --upscale`, bit for bit."""
    tiny, small = model_dir("tiny-t2v"), model_dir("small-t2v")
    common = ["--seed", "3", "--steps", "2", "-f", "2", "--scheduler", "ddim", "-n", "blurry", "-q"]
    run_cli(t2v_bin, "generate", "a cat", "--model", str(tiny), "--height", "16", "--width", "16",
            "--upscale", str(small), "--upscale-size", "48x32", "--upscale-strength", "0.5",
            "-o", "up.npy", *common, cwd=tmp_path)
    expected = np.load(tmp_path / "up.npy")

    low = t2v.TextToVideoSDPipeline.from_pretrained(tiny)
    low.scheduler = t2v.DDIMScheduler.from_config(low.scheduler.config)
    low.set_progress_bar_config(disable=True)
    first = low("a cat", height=16, width=16, num_frames=2, num_inference_steps=2, guidance_scale=9.0,
                negative_prompt="blurry", generator=3).frames[0]
    del low
    xl = t2v.VideoToVideoSDPipeline.from_pretrained(small)
    xl.scheduler = t2v.DDIMScheduler.from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    frames = xl("a cat", video=first, strength=0.5, num_inference_steps=2, guidance_scale=9.0,
                negative_prompt="blurry", generator=3, height=32, width=48).frames[0]
    assert frames.shape == expected.shape == (2, 32, 48, 3)
    assert np.array_equal(frames, expected), f"max abs diff {np.abs(frames - expected).max():.3e}"

    # The hand-off itself: 8-bit, resized; one side alone keeps the other; bad sizes are refused.
    handed = t2v._t2v.first_pass_frames(np.ascontiguousarray(first), 32, 48)
    assert handed.dtype == np.uint8 and handed.shape == (2, 32, 48, 3)
    same = t2v._t2v.first_pass_frames(np.ascontiguousarray(first), 16, 16)
    assert np.array_equal(same, np.clip(np.round(first * 255), 0, 255).astype(np.uint8))
    taller = xl("a cat", video=first, strength=0.5, num_inference_steps=2, generator=3, height=24).frames[0]
    assert taller.shape == (2, 24, 16, 3)
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="height must be a positive whole number"):
            xl("a cat", video=first, strength=0.5, num_inference_steps=2, height=bad)
