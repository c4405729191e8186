"""Shared fixtures of the t2v Python tests: the repository's fixture models and their references."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

import t2v

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "fixtures"


def model_dir(name: str) -> Path:
    return FIXTURES / name


def reference(name: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir(name) / "reference.safetensors"))


def reference_json(name: str) -> dict:
    return json.loads((model_dir(name) / "reference.json").read_text())


def skip_or_fail(reason: str):
    """Skips a test whose tool is missing; in CI (CI=true), where .ci/run installs every tool,
    fails it instead, so that a missing tool can never pass as a skipped test."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: CI must run every test)")
    pytest.skip(reason)


_PIPES: dict = {}


def pipeline(name: str) -> t2v.TextToVideoSDPipeline:
    """One loaded pipeline per fixture model for the whole session (loading is the slow part);
    its scheduler is reset to the checkpoint's by each test that uses it."""
    if name not in _PIPES:
        pipe = t2v.TextToVideoSDPipeline.from_pretrained(model_dir(name))
        _PIPES[name] = (pipe, pipe.scheduler)
    pipe, checkpoint_scheduler = _PIPES[name]
    pipe.scheduler = checkpoint_scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny() -> t2v.TextToVideoSDPipeline:
    return pipeline("tiny-t2v")


@pytest.fixture
def small() -> t2v.TextToVideoSDPipeline:
    return pipeline("small-t2v")


@pytest.fixture(scope="session")
def t2v_bin() -> Path:
    """The `t2v` command line (T2V_BIN, as `cargo build -p t2v-cli` leaves it in target/debug)."""
    path = os.environ.get("T2V_BIN")
    if not path:
        skip_or_fail("T2V_BIN is not set: build the command line (cargo build -p t2v-cli) and point T2V_BIN at it")
    if not Path(path).is_file():
        skip_or_fail(f"T2V_BIN={path} is not a file")
    return Path(path)


def run_cli(binary: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def copy_model(name: str, into: Path) -> Path:
    target = into / name
    shutil.copytree(model_dir(name), target, ignore=shutil.ignore_patterns("reference.*"))
    return target


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture
def ctrl_c():
    """SIGINT raising KeyboardInterrupt, as in a terminal, for the tests that send it: a launcher
    that runs pytest in the background (`cmd &` in a script) leaves SIGINT ignored, and Python
    then never installs its handler."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
