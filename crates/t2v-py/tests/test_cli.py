"""The Python API and the command line run the same library: bit-equal frames for the same
settings, and the same H.264 stream in the MP4."""

import struct
from pathlib import Path

import numpy as np
import pytest

import t2v
from conftest import model_dir, pipeline, run_cli

CASES = [
    # (scheduler, eta, guidance, negative prompt, seed)
    ("dpm", 0.0, 7.5, "blurry", 5),
    ("ddim", 0.5, 9.0, None, 11),
    ("ddim", 0.0, 1.0, None, 2),
]


def python_frames(scheduler: str, eta: float, guidance: float, negative, seed: int) -> np.ndarray:
    pipe = pipeline("tiny-t2v")
    if scheduler == "dpm":
        pipe.scheduler = t2v.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe(
        "a corgi surfing a wave",
        negative_prompt=negative,
        num_inference_steps=3,
        guidance_scale=guidance,
        eta=eta,
        num_frames=4,
        generator=t2v.Generator().manual_seed(seed),
    ).frames[0]


def cli_args(scheduler: str, eta: float, guidance: float, negative, seed: int) -> list:
    args = ["generate", "a corgi surfing a wave", "-m", str(model_dir("tiny-t2v")), "--seed", str(seed),
            "--steps", "3", "--scheduler", scheduler, "--eta", str(eta), "-g", str(guidance), "-f", "4",
            "--device", "cpu", "-q"]
    if negative is not None:
        args += ["-n", negative]
    return args


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-eta{c[1]}-g{c[2]}" for c in CASES])
def test_frames_are_bit_equal_to_the_command_line(t2v_bin, tmp_path, case):
    run_cli(t2v_bin, *cli_args(*case), "-o", "cli.npy", cwd=tmp_path)
    expected = np.load(tmp_path / "cli.npy")
    frames = python_frames(*case)
    assert frames.shape == expected.shape == (4, 32, 32, 3)
    assert np.array_equal(frames, expected), f"max abs diff {np.abs(frames - expected).max():.3e}"


def boxes(data: bytes) -> dict:
    """Top-level MP4 boxes by type."""
    found, pos = {}, 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        found[kind.decode()] = data[pos + 8 : pos + size]
        pos += size
    return found


def test_mp4_carries_the_command_lines_h264(t2v_bin, tmp_path):
    case = CASES[0]
    run_cli(t2v_bin, *cli_args(*case), "-o", "cli.mp4", "--fps", "8", cwd=tmp_path)
    path = t2v.export_to_video(python_frames(*case)[None], tmp_path / "py.mp4", fps=8)
    assert path == str(tmp_path / "py.mp4")
    cli, ours = boxes((tmp_path / "cli.mp4").read_bytes()), boxes(Path(path).read_bytes())
    assert cli["ftyp"] == ours["ftyp"]
    # The coded frames are identical; only the command line's settings comment differs in moov.
    assert len(ours["mdat"]) > 1000 and ours["mdat"] == cli["mdat"]
    assert t2v._t2v.read_mp4_metadata(path) is None
    assert t2v._t2v.read_mp4_metadata(tmp_path / "cli.mp4") is not None


# The published 1.7B's scheduler_config.json (diffusers 0.15: no timestep_spacing, PNDM's
# skip_prk_steps, trained_betas null), the form the model card's script meets.
PUBLISHED_SCHEDULER = Path(__file__).resolve().parents[2] / "t2v" / "configs" / "full-1.7b" / "scheduler" / "scheduler_config.json"


@pytest.fixture(scope="module")
def published_style_model(tmp_path_factory) -> Path:
    """tiny-t2v with the published checkpoint's scheduler config in place of its full one."""
    from conftest import copy_model

    root = copy_model("tiny-t2v", tmp_path_factory.mktemp("published"))
    published = PUBLISHED_SCHEDULER.read_text()
    assert '"timestep_spacing"' not in published
    (root / "scheduler" / "scheduler_config.json").write_text(published)
    return root


def test_the_model_card_script_on_a_published_config_matches_the_command_line(t2v_bin, tmp_path, published_style_model):
    """`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` takes DPM-Solver's own
    `linspace` spacing (the DDIM config defaulted its `leading`), as diffusers does and as
    `t2v generate --scheduler dpm` does; and back to DDIM restores DDIM's `leading` and the file's
    `clip_sample: false`."""
    pipe = t2v.TextToVideoSDPipeline.from_pretrained(published_style_model)
    pipe.set_progress_bar_config(disable=True)
    assert "timestep_spacing" in pipe.scheduler.config["_use_default_values"]
    pipe.scheduler = t2v.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(4)
    assert list(pipe.scheduler.timesteps) == [999, 749, 500, 250]
    run = dict(num_inference_steps=4, num_frames=4, guidance_scale=9.0)
    seed = 7
    for scheduler in ("dpm", "ddim"):
        if scheduler == "ddim":
            pipe.scheduler = t2v.DDIMScheduler.from_config(pipe.scheduler.config)
            assert pipe.scheduler.config["clip_sample"] is False
            pipe.scheduler.set_timesteps(4)
            assert list(pipe.scheduler.timesteps) == [751, 501, 251, 1]
        frames = pipe("a corgi surfing a wave", generator=t2v.Generator("cpu").manual_seed(seed), **run).frames[0]
        out = tmp_path / f"{scheduler}.npy"
        run_cli(t2v_bin, "generate", "a corgi surfing a wave", "-m", str(published_style_model), "--seed", str(seed),
                "--steps", "4", "--scheduler", scheduler, "-f", "4", "--device", "cpu", "-q", "-o", str(out), cwd=tmp_path)
        expected = np.load(out)
        diff = float(np.abs(frames - expected).max())
        print(f"published-style config, {scheduler}: max abs difference Python - command line {diff:.3e}")
        assert np.array_equal(frames, expected), f"{scheduler}: max abs diff {diff:.3e}"
