"""Writing frames to video files, as diffusers' ``diffusers.utils.export_to_video`` /
``export_to_gif``, with t2v's encoders: the MP4 is the command line's H.264; and reading them, as
``diffusers.utils.load_video``, with t2v's decoders."""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Callable, List, Optional, Union

import numpy as np

from . import _t2v

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_FPS: int = _t2v.DEFAULT_FPS
DEFAULT_QP: int = _t2v.DEFAULT_QP


def _frames(video_frames: Any) -> np.ndarray:
    """(frames, height, width, 3) float32 in [0, 1] from what a pipeline returns or diffusers'
    exporters take: a batch of one video (1, F, H, W, 3), one video (F, H, W, 3), a list of
    (H, W, 3) frames (float in [0, 1] or uint8), or a list of PIL images (also nested in a list,
    as ``output_type="pil"`` gives them)."""
    if isinstance(video_frames, (list, tuple)):
        if len(video_frames) == 0:
            raise ValueError("there are no frames to write")
        if isinstance(video_frames[0], (list, tuple)):
            if len(video_frames) != 1:
                raise ValueError(f"a batch of {len(video_frames)} videos: pass one of them (frames[i])")
            return _frames(video_frames[0])
        if hasattr(video_frames[0], "convert") and hasattr(video_frames[0], "size"):
            video_frames = [np.asarray(image.convert("RGB")) for image in video_frames]
        video_frames = np.stack([np.asarray(frame) for frame in video_frames])
    frames = np.asarray(video_frames)
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"a batch of {frames.shape[0]} videos: pass one of them (frames[i])")
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be (frames, height, width, 3) RGB (or a batch of one such video), got the shape {frames.shape}"
        )
    if frames.dtype == np.uint8:
        frames = frames.astype(np.float32) / np.float32(255)
    elif not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be floats in [0, 1] or uint8, got {frames.dtype}")
    return np.ascontiguousarray(frames, dtype=np.float32)


def _output_path(path: Optional[PathLike], suffix: str) -> str:
    if path is not None:
        return os.fspath(path)
    # A file that stays (diffusers hands out the name of a deleted temporary file).
    fd, name = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return name


def _ignored(**options: Any) -> None:
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        warnings.warn(
            f"t2v ignores {', '.join(given)} (imageio's options): it encodes H.264 at the quantiser qp "
            f"(default {DEFAULT_QP}, visually lossless) and keeps the frame size",
            UserWarning,
            stacklevel=3,
        )


def export_to_video(
    video_frames: Any,
    output_video_path: Optional[PathLike] = None,
    fps: int = DEFAULT_FPS,
    quality: Optional[float] = None,
    bitrate: Optional[int] = None,
    macro_block_size: Optional[int] = None,
    *,
    qp: int = DEFAULT_QP,
) -> str:
    """Writes frames as an H.264 MP4 (yuv420p, fast start), the same file the t2v command line
    writes for these frames (without its settings comment). The file appears only once
    complete, replacing what is at the path.

    Args:
        video_frames: one video: ``pipe(...).frames`` (a batch of one), ``frames[0]``, frames
            (F, H, W, 3) float in [0, 1] or uint8, or a list of frames or PIL images.
        output_video_path: where to write; default: a new temporary ``.mp4`` file (kept).
        fps: frames per second (t2v's default 8, as the original model's videos; diffusers' is 10).
        quality: imageio's option: ignored (with a warning).
        bitrate: imageio's option: ignored (with a warning).
        macro_block_size: imageio's option: ignored (with a warning); odd sizes are padded as
            H.264 needs and cropped back in the file.
        qp: H.264 quantiser, 12 (best) to 51 (smallest); 16 is visually lossless.

    Returns:
        The path written.

    Raises:
        ValueError: frames of a wrong shape or type, or a bad fps or qp.
        OSError: the file cannot be written (its folder must exist).
    """
    _ignored(quality=quality, bitrate=bitrate, macro_block_size=macro_block_size)
    frames = _frames(video_frames)
    path = _output_path(output_video_path, ".mp4")
    _t2v.write_video(frames, path, format="mp4", fps=_positive(fps, "fps"), qp=_qp(qp))
    return path


def export_to_gif(
    image: Any,
    output_gif_path: Optional[PathLike] = None,
    fps: int = DEFAULT_FPS,
) -> str:
    """Writes frames as an animated GIF that loops forever (a palette of 256 colours a frame),
    as the t2v command line does.

    Args:
        image: one video, as :func:`export_to_video` takes it (diffusers passes PIL images).
        output_gif_path: where to write; default: a new temporary ``.gif`` file (kept).
        fps: frames per second (t2v's default 8; diffusers' is 10).

    Returns:
        The path written.
    """
    frames = _frames(image)
    path = _output_path(output_gif_path, ".gif")
    _t2v.write_video(frames, path, format="gif", fps=_positive(fps, "fps"), qp=DEFAULT_QP)
    return path


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def _qp(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or not _t2v.MIN_QP <= value <= _t2v.MAX_QP:
        raise ValueError(f"qp must be a whole number from {_t2v.MIN_QP} (best) to {_t2v.MAX_QP}, got {value!r}")
    return int(value)


def load_video(
    video: PathLike,
    convert_method: Optional[Callable[[List[Any]], List[Any]]] = None,
) -> List[Any]:
    """Reads a video's frames as PIL images (diffusers' ``load_video``), with the readers of the
    t2v command line: an MP4 (H.264), a GIF, a ``.npy`` array (F, H, W, 3), or a folder of PNG or
    JPEG frames. At most the first 64 frames are read (with a warning when there are more), as the
    command line does. Needs Pillow.

    Args:
        video: the path of the file or folder (URLs are not fetched: download the file first).
        convert_method: applied to the list of images before it is returned (diffusers' option).

    Returns:
        The frames as RGB ``PIL.Image.Image``, in order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is not a video t2v reads, or a corrupt one.
    """
    path = os.fspath(video)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"t2v does not download videos: fetch {path} first and pass the file's path")
    try:
        import PIL.Image
    except ImportError:
        raise ImportError("load_video needs Pillow: pip install pillow") from None
    frames, notes = _t2v.read_video(path)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    images = [PIL.Image.fromarray(frame) for frame in frames]
    return convert_method(images) if convert_method is not None else images
