"""The model card's script runs on t2v with `import t2v` in place of the diffusers and torch
imports, pointed at a fixture model."""

import difflib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import ROOT

HERE = Path(__file__).parent / "model_card"


def test_the_script_differs_from_the_model_cards_in_imports_and_model_only():
    original = (HERE / "diffusers_script.py").read_text().splitlines()
    ours = (HERE / "t2v_script.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(original, ours, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == [
        "-import torch",
        "-from diffusers import TextToVideoMSPipeline, DPMSolverMultistepScheduler",
        "-from diffusers.utils import export_to_video",
        '-pipe = TextToVideoMSPipeline.from_pretrained("diffusers/ms-text-to-video-sd", torch_dtype=torch.float16)',
        "+import t2v",
        "+from t2v import TextToVideoMSPipeline, DPMSolverMultistepScheduler",
        "+from t2v.utils import export_to_video",
        '+pipe = TextToVideoMSPipeline.from_pretrained("fixtures/small-t2v", torch_dtype=t2v.float16)',
    ]


def test_the_model_card_script_runs(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(HERE / "t2v_script.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    video = Path(result.stdout.strip().splitlines()[-1])
    assert video.parent == tmp_path and video.suffix == ".mp4"
    data = video.read_bytes()
    assert data[4:8] == b"ftyp" and len(data) > 10_000
    import t2v

    if t2v._t2v.open_device("auto") == "cpu":
        assert "running on the CPU" in result.stderr and "computing in float32" in result.stderr
