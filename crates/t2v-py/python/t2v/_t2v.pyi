"""Type stubs of the native module `t2v._t2v` (the Rust half of the package)."""

import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str
DEFAULT_FPS: int
DEFAULT_QP: int
MIN_QP: int
MAX_QP: int

_Path = Union[str, "os.PathLike[str]"]

def resolve_model(
    spec: str,
    *,
    variant: Optional[str] = None,
    offline: bool = False,
    cache_dir: Optional[_Path] = None,
    token: Optional[str] = None,
) -> str: ...
def check_model(root: _Path, *, variant: Optional[str] = None) -> Tuple[int, int]: ...
def open_device(spec: str) -> str: ...
def scheduler_from_config(scheduler: str, config_json: str, overrides_json: str) -> str: ...
def scheduler_timesteps(scheduler: str, config_json: str, num_inference_steps: int) -> List[int]: ...
def write_video(
    frames: npt.NDArray[np.float32],
    path: _Path,
    *,
    format: str,
    fps: int,
    qp: int,
    metadata: Optional[str] = None,
) -> None: ...
def read_mp4_metadata(path: _Path) -> Optional[str]: ...
def read_video(
    path: _Path, *, start_frame: int = 0, every: int = 1, max_frames: Optional[int] = None
) -> Tuple[npt.NDArray[np.uint8], List[str]]: ...
def first_pass_frames(frames: npt.NDArray[np.float32], height: int, width: int) -> npt.NDArray[np.uint8]: ...

class Model:
    def __init__(
        self, root: _Path, *, device: str = "cpu", dtype: str = "float32", variant: Optional[str] = None
    ) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    def scheduler_config(self) -> str: ...
    def prompt_warnings(self, prompt: str) -> List[str]: ...
    def validate(
        self,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        eta: float,
        num_frames: int,
        height: Optional[int],
        width: Optional[int],
        context_length: Optional[int] = None,
        context_stride: int = 4,
        context_weighting: str = "pyramid",
        prompts: Optional[Dict[int, str]] = None,
        negative_prompts: Optional[Dict[int, str]] = None,
    ) -> Tuple[int, int]: ...
    def validate_video(
        self,
        shape: Tuple[int, int, int, int],
        *,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        eta: float,
    ) -> int: ...
    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: Optional[str],
        seed: int,
        num_inference_steps: int,
        guidance_scale: float,
        scheduler: str,
        scheduler_config: str,
        eta: float,
        num_frames: int,
        height: Optional[int],
        width: Optional[int],
        on_step: Optional[Callable[[int, int, Optional[npt.NDArray[np.float32]]], Any]] = None,
        step_latents: bool = False,
        latent: bool = False,
        video: Optional[npt.NDArray[np.float32]] = None,
        strength: Optional[float] = None,
        context_length: Optional[int] = None,
        context_stride: int = 4,
        context_weighting: str = "pyramid",
        prompts: Optional[Dict[int, str]] = None,
        negative_prompts: Optional[Dict[int, str]] = None,
    ) -> npt.NDArray[np.float32]: ...
def library_defaults() -> dict[str, float]: ...
