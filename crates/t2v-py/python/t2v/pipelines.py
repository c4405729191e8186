"""``TextToVideoSDPipeline`` and ``VideoToVideoSDPipeline`` with diffusers' API over the t2v library
(no torch).

One file, as diffusers' own pipeline module: both pipelines share their base class and the input
handling below it."""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _t2v
from .generator import seeds_for
from .schedulers import DDIMScheduler, FrozenDict, SchedulerMixin, SCHEDULERS, as_scheduler

PathLike = Union[str, "os.PathLike[str]"]

_DEVICE = re.compile(r"^(cpu|cuda|metal|mps|auto)(:\d+)?$")


class TextToVideoSDPipelineOutput:
    """What a pipeline call returns (diffusers' ``TextToVideoSDPipelineOutput``).

    Attributes:
        frames: with ``output_type="np"``, float32 of shape (batch, frames, height, width, 3)
            in [0, 1]; a list (per prompt) of lists of PIL images with ``"pil"``; a torch tensor
            (batch, frames, 3, height, width) with ``"pt"``; the latents (batch, channels,
            frames, height / 8, width / 8) with ``"latent"``.
        seeds: the seed of each video (t2v's addition: with ``generator=None`` the seeds are
            random, and this is how to repeat a video).
    """

    def __init__(self, frames: Any, seeds: List[int]) -> None:
        self.frames = frames
        self.seeds = seeds

    def __getitem__(self, key: Union[int, str]) -> Any:
        # diffusers' outputs index as tuples and as dicts.
        if key in (0, "frames"):
            return self.frames
        raise KeyError(key)

    def to_tuple(self) -> Tuple[Any]:
        return (self.frames,)

    def __repr__(self) -> str:
        shape = getattr(self.frames, "shape", None)
        return f"TextToVideoSDPipelineOutput(frames={'shape ' + str(tuple(shape)) if shape is not None else type(self.frames).__name__}, seeds={self.seeds})"


class _Component:
    """A model of the pipeline as scripts reach it (``pipe.unet.config``,
    ``pipe.unet.enable_forward_chunking()``): its configuration, and diffusers' memory switches
    accepted without effect (see :meth:`TextToVideoSDPipeline.enable_vae_slicing`)."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.name = name
        self.config = FrozenDict(config)

    def enable_forward_chunking(self, chunk_size: Optional[int] = None, dim: int = 0) -> None:
        """No effect: t2v's feed-forward layers already work through the tokens in blocks."""

    def disable_forward_chunking(self) -> None:
        """No effect (see :meth:`enable_forward_chunking`)."""

    def enable_slicing(self) -> None:
        """No effect: t2v's VAE decodes one frame at a time."""

    def disable_slicing(self) -> None:
        """No effect (see :meth:`enable_slicing`)."""

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        """No effect: t2v decodes each frame whole (frames of these models are small)."""

    def disable_tiling(self) -> None:
        """No effect (see :meth:`enable_tiling`)."""

    def __repr__(self) -> str:
        return f"<t2v {self.name}: {self.config.get('_class_name', '?')}>"


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    name = str(dtype).strip().lower()
    name = name[len("torch."):] if name.startswith("torch.") else name
    names = {"float32": "float32", "float": "float32", "fp32": "float32", "f32": "float32",
             "float16": "float16", "half": "float16", "fp16": "float16", "f16": "float16",
             "bfloat16": "bfloat16", "bf16": "bfloat16"}
    if name not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16 (or torch's dtypes)")
    return names[name]


def _device_name(device: Any) -> str:
    name = str(device).strip().lower()
    if not _DEVICE.match(name):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N, metal (mps), metal:N or auto")
    return name.replace("mps", "metal")


def _is_dtype(value: Any) -> bool:
    try:
        _dtype_name(value)
        return True
    except ValueError:
        return False


# The pipeline classes of checkpoints that hold these models: one checkpoint serves both pipelines.
_PIPELINE_CLASSES: Tuple[str, ...] = ("TextToVideoSDPipeline", "TextToVideoMSPipeline", "VideoToVideoSDPipeline")


class _ModelScopePipeline:
    """What :class:`TextToVideoSDPipeline` and :class:`VideoToVideoSDPipeline` share: loading,
    devices and dtypes, the scheduler, diffusers' switches, and the run itself.

    The weights are read when the pipeline first runs, onto the device and in the dtype chosen by
    then (``from_pretrained(torch_dtype=...)``, :meth:`to`): nothing is loaded twice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"make a {type(self).__name__} with {type(self).__name__}.from_pretrained(path_or_repo_id): "
            "t2v builds the models from a checkpoint, not from torch modules"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: PathLike,
        *,
        torch_dtype: Any = None,
        variant: Optional[str] = None,
        scheduler: Optional[SchedulerMixin] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        local_files_only: bool = False,
        token: Optional[str] = None,
        **kwargs: Any,
    ) -> "TextToVideoSDPipeline":
        """A pipeline for a checkpoint in the diffusers layout.

        Args:
            pretrained_model_name_or_path: a local folder (``model_index.json``, ``scheduler/``,
                ``text_encoder/``, ``tokenizer/``, ``unet/``, ``vae/``) or a Hugging Face repo id
                (``damo-vilab/text-to-video-ms-1.7b``), downloaded once into the Hugging Face cache
                (``HF_HOME``, ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` to stay offline).
            torch_dtype: the compute dtype: ``"float32"`` (default; the reference's numbers),
                ``"float16"`` (on a GPU float16 throughout; on the CPU weights stored in float16,
                float32 activations, products in float16 with AVX512_FP16, the fastest there
                without AMX; frames within about 2e-2) or ``"bfloat16"`` (on the CPU: weights
                stored in bfloat16, products in bfloat16 on AMX, or with AVX512_BF16 where that
                beats float32); ``t2v.float16`` or torch's dtypes work too.
            variant: ``"fp16"`` reads the ``*.fp16.safetensors`` weights (half the download).
            scheduler: a scheduler to run with instead of the checkpoint's.
            revision: a branch, tag or commit of the repo.
            cache_dir: the Hugging Face cache to use.
            local_files_only: never use the network: the model must be in the cache.
            token: a Hugging Face token (default: ``HF_TOKEN`` or the saved one).
            **kwargs: diffusers' loading options that have no meaning for t2v
                (``low_cpu_mem_usage``, ``use_safetensors``, ``device_map``, ...) are ignored with
                a warning; a model component (``unet=``, ``vae=``, ...) raises TypeError.

        Raises:
            FileNotFoundError: no such folder, not a repo id, or a file of the checkpoint missing.
            ValueError: a checkpoint t2v cannot run (its classes or configs), or a bad value.
        """
        components = sorted(k for k in ("unet", "vae", "text_encoder", "tokenizer") if k in kwargs)
        if components:
            raise TypeError(
                f"t2v builds {', '.join(components)} from the checkpoint itself: it cannot take torch modules"
            )
        if kwargs:
            warnings.warn(
                f"from_pretrained ignores {', '.join(sorted(kwargs))}: t2v has no such loading option",
                UserWarning,
                stacklevel=2,
            )
        spec = os.fspath(pretrained_model_name_or_path)
        if revision and not os.path.isdir(spec):
            spec = f"{spec}@{revision}"
        dtype = _dtype_name(torch_dtype)
        root = os.fspath(
            _t2v.resolve_model(
                spec,
                variant=variant,
                offline=local_files_only,
                cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
                token=token,
            )
        )
        default_size = _t2v.check_model(root, variant=variant)
        index = _read_json(os.path.join(root, "model_index.json"))
        pipeline_class = index.get("_class_name", "")
        target = cls._loads_as(pipeline_class)
        if pipeline_class not in _PIPELINE_CLASSES:
            warnings.warn(
                f"{spec} is a {pipeline_class or 'pipeline of no named class'}, loaded as a {target.__name__}",
                UserWarning,
                stacklevel=2,
            )
        pipe = object.__new__(target)
        pipe._init(spec, root, index, dtype, variant, default_size)
        if scheduler is not None:
            pipe.scheduler = scheduler
        return pipe

    @classmethod
    def _loads_as(cls, pipeline_class: str) -> type:
        """The class a checkpoint of ``pipeline_class`` loads as through this class."""
        return cls

    @classmethod
    def from_pipe(cls, pipeline: "_ModelScopePipeline", **kwargs: Any) -> Any:
        """A pipeline of this class on the same checkpoint, sharing ``pipeline``'s loaded weights,
        device, dtype and scheduler (diffusers' ``from_pipe``): ``VideoToVideoSDPipeline.from_pipe(pipe)``
        re-renders videos with the model already in memory. ``scheduler=`` gives it another scheduler.

        Raises:
            TypeError: ``pipeline`` is not a t2v pipeline, or an option other than ``scheduler``.
        """
        if not isinstance(pipeline, _ModelScopePipeline):
            raise TypeError(f"from_pipe takes a t2v pipeline, not {type(pipeline).__name__}")
        scheduler = kwargs.pop("scheduler", None)
        if kwargs:
            raise TypeError(f"from_pipe got unexpected arguments: {', '.join(sorted(kwargs))}")
        pipe = object.__new__(cls._loads_as(""))
        pipe._init(pipeline.name_or_path, pipeline._root, dict(pipeline.config), pipeline._dtype, pipeline._variant, pipeline._default_size)
        pipe._device = pipeline._device
        pipe._adapters = dict(pipeline._adapters)
        pipe._active_adapters = dict(pipeline._active_adapters)
        pipe._lora_enabled = pipeline._lora_enabled
        pipe._lora_scale = pipeline._lora_scale
        pipe._model = pipeline._load()
        pipe._progress_bar_config = dict(pipeline._progress_bar_config)
        pipe._scheduler = as_scheduler(scheduler) if scheduler is not None else pipeline._scheduler
        return pipe

    def _init(self, spec: str, root: str, index: Dict[str, Any], dtype: str, variant: Optional[str], default_size: Tuple[int, int]) -> None:
        self.name_or_path = spec
        self._root = root
        self._dtype = dtype
        self._variant = variant
        self._device = "cpu"
        self._default_size = default_size
        self._model: Optional[Any] = None
        self._lock = threading.Lock()
        self._interrupt = False
        self._progress_bar_config: Dict[str, Any] = {}
        self._free_noise: Optional[Dict[str, Any]] = None
        # LoRA adapters by name (their files), the active ones with their weights: merged into the
        # weights when the model loads, so a change reloads it on the next run.
        self._adapters: Dict[str, str] = {}
        self._active_adapters: Dict[str, float] = {}
        self._lora_enabled = True
        self._lora_scale = 1.0
        self.config = FrozenDict(index)
        scheduler_config = _read_json(os.path.join(root, "scheduler", "scheduler_config.json"))
        scheduler_class = SCHEDULERS.get(scheduler_config.get("_class_name", ""))
        if scheduler_class is None:
            warnings.warn(
                f"the checkpoint's scheduler is a {scheduler_config.get('_class_name')}, which t2v does not "
                "implement: it runs with DDIM built from its configuration",
                UserWarning,
                stacklevel=3,
            )
            scheduler_class = DDIMScheduler
        self._scheduler: SchedulerMixin = scheduler_class.from_config(scheduler_config)
        for name in ("unet", "vae", "text_encoder"):
            setattr(self, name, _Component(name, _read_json(os.path.join(root, name, "config.json"))))

    # -- what diffusers' pipelines expose ------------------------------------------------------

    @property
    def scheduler(self) -> SchedulerMixin:
        """The scheduler the pipeline runs with; assign ``t2v.DDIMScheduler`` or
        ``t2v.DPMSolverMultistepScheduler`` (or diffusers' schedulers of those classes)."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        self._scheduler = as_scheduler(value)

    @property
    def device(self) -> str:
        """Where the pipeline runs: ``"cpu"``, ``"cuda:N"`` or ``"metal:N"``."""
        return self._device

    @property
    def dtype(self) -> str:
        """The compute dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
        return self._dtype

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a step callback to stop after that step: the
        frames decoded from the latents so far come back, as in diffusers."""
        return self._interrupt

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.get("block_out_channels", [0] * 4)) - 1)

    def to(self, *args: Any, **kwargs: Any) -> "TextToVideoSDPipeline":
        """Moves the pipeline to a device and/or dtype, as diffusers' ``pipe.to("cuda")``,
        ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.float16)``,
        ``pipe.to(device=..., dtype=...)``.

        Devices: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"metal"`` (``"mps"``), ``"metal:N"``,
        ``"auto"`` (a GPU if there is one), or a ``torch.device``. A GPU that this build of t2v
        cannot use (built without the ``cuda``/``metal`` feature, or none present) leaves the
        pipeline on the CPU with a warning, so that scripts written for a GPU still run; a
        float16 or bfloat16 pipeline then computes in float32, the reference's numbers (an
        explicit ``to("cpu")`` with float16 keeps float16: float16 weights, multiplied in
        float16 where the CPU has AVX512_FP16).

        Returns the pipeline itself.

        Raises:
            ValueError: an unknown device or dtype name.
        """
        device = kwargs.pop("torch_device", kwargs.pop("device", None))
        dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise TypeError(f"to() got unexpected arguments: {', '.join(sorted(kwargs))}")
        for arg in args:
            if _is_dtype(arg) and not _DEVICE.match(str(arg).strip().lower()):
                dtype = arg
            else:
                device = arg
        if dtype is not None:
            self._set(dtype=_dtype_name(dtype))
        if device is not None:
            self._set(device=self._open_device(_device_name(device)))
        return self

    def _open_device(self, name: str) -> str:
        try:
            return _t2v.open_device(name)
        except RuntimeError as err:
            if name.startswith("cpu"):
                raise
            kind = name.split(":")[0]
            reason = (
                f"this build of t2v has no {kind} support (build it with "
                f'MATURIN_PEP517_ARGS="--features {kind}" pip install ./crates/t2v-py)'
                if "built without" in str(err)
                else str(err)
            )
            message = f"running on the CPU: {reason}"
            if self._dtype != "float32":
                # Half precision was asked for the GPU's sake; on the CPU float32 gives the
                # reference's numbers (half precision there is a choice of its own: `.to("cpu",
                # dtype)`). Weights stored in float16 stay float16 in memory either way.
                message += (
                    f"; computing in float32 instead of {self._dtype} "
                    f"(to keep it on the CPU: .to(\"cpu\", \"{self._dtype}\"))"
                )
                self._set(dtype="float32")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return "cpu"

    def _set(self, device: Optional[str] = None, dtype: Optional[str] = None) -> None:
        with self._lock:
            changed = (device is not None and device != self._device) or (dtype is not None and dtype != self._dtype)
            self._device = device or self._device
            self._dtype = dtype or self._dtype
            if changed:
                # Read again on the next run, straight onto the new device or in the new dtype.
                self._model = None

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = _t2v.Model(
                    self._root, device=self._device, dtype=self._dtype, variant=self._variant, loras=self._lora_list()
                )
            return self._model

    # -- LoRA, as diffusers' LoraLoaderMixin spells it --------------------------------------------

    def _lora_list(self) -> List[Tuple[str, float]]:
        if not self._lora_enabled:
            return []
        return [(self._adapters[name], weight * self._lora_scale) for name, weight in self._active_adapters.items()]

    def _lora_changed(self) -> None:
        with self._lock:
            # Merged into the weights when the model is read again, on the next run.
            self._model = None

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: PathLike,
        adapter_name: Optional[str] = None,
        weight_name: Optional[str] = None,
        subfolder: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Loads a LoRA (diffusers/PEFT ``.safetensors`` with ``lora_A``/``lora_B`` or
        ``lora.down``/``lora.up`` keys, kohya's ``lora_unet_…``, or a PEFT adapter folder) as the
        adapter ``adapter_name`` and makes it the active one (weight 1), as diffusers does. t2v
        merges active LoRAs into the weights, ``W + weight · alpha/r · B·A``, once when the model
        next loads: runs cost nothing extra.

        Raises:
            FileNotFoundError: no such file or folder.
            ValueError: the LoRA does not fit this model (the first key that does not is named),
                or the adapter name is taken.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            raise TypeError("t2v loads LoRAs from files: save the state dict with safetensors and pass its path")
        path = os.fspath(pretrained_model_name_or_path_or_dict)
        if subfolder:
            path = os.path.join(path, subfolder)
        if weight_name:
            path = os.path.join(path, weight_name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no LoRA at {path}: give a .safetensors file or a folder holding one")
        name = adapter_name if adapter_name is not None else f"default_{len(self._adapters)}"
        if name in self._adapters:
            raise ValueError(f"adapter name {name!r} is already in use: choose another adapter_name")
        _t2v.check_lora(self._root, path, variant=self._variant)
        self._adapters[name] = os.path.abspath(path)
        self._active_adapters = {name: 1.0}
        self._lora_changed()

    def set_adapters(
        self, adapter_names: Union[str, Sequence[str]], adapter_weights: Union[float, Sequence[float], None] = None
    ) -> None:
        """Makes ``adapter_names`` the active LoRAs with ``adapter_weights`` (1 each by default;
        one number for all); their updates add.

        Raises:
            ValueError: an adapter that was not loaded, or a count of weights that does not match.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter weights")
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: {', '.join(self._adapters) or 'none'}")
        self._active_adapters = dict(zip(names, weights))
        self._lora_changed()

    def get_active_adapters(self) -> List[str]:
        """The names of the active LoRAs."""
        return list(self._active_adapters) if self._lora_enabled else []

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """The loaded LoRAs by component, as diffusers (t2v's apply to the UNet and text encoder)."""
        return {"unet": list(self._adapters)} if self._adapters else {}

    def disable_lora(self) -> None:
        """Runs without the LoRAs (they stay loaded)."""
        self._lora_enabled = False
        self._lora_changed()

    def enable_lora(self) -> None:
        """Runs with the active LoRAs again."""
        self._lora_enabled = True
        self._lora_changed()

    def delete_adapters(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Forgets the named LoRAs."""
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self._adapters.pop(name, None)
            self._active_adapters.pop(name, None)
        self._lora_changed()

    def unload_lora_weights(self) -> None:
        """Forgets every LoRA: the checkpoint's own weights again."""
        self._adapters.clear()
        self._active_adapters.clear()
        self._lora_scale = 1.0
        self._lora_changed()

    def fuse_lora(self, components: Sequence[str] = ("unet", "text_encoder"), lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> None:
        """Fuses the active LoRAs (or ``adapter_names``) into the weights at ``lora_scale``. t2v
        always merges LoRAs into the weights, so this sets the scale they are merged with."""
        if adapter_names is not None:
            self.set_adapters(list(adapter_names), [self._active_adapters.get(n, 1.0) for n in adapter_names])
        self._lora_scale = float(lora_scale)
        self._lora_changed()

    def unfuse_lora(self, components: Sequence[str] = ("unet", "text_encoder"), **kwargs: Any) -> None:
        """Undoes ``fuse_lora``'s scale: the active LoRAs at their own weights."""
        self._lora_scale = 1.0
        self._lora_changed()

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options of the per-step progress bar (tqdm's; ``disable=True`` hides it). The bar is
        shown when tqdm is installed."""
        self._progress_bar_config = dict(kwargs)

    # -- memory switches: accepted so that diffusers scripts run unchanged ---------------------

    def enable_model_cpu_offload(self, gpu_id: Optional[int] = None, device: Any = "cuda") -> None:
        """Runs on the GPU, as diffusers' offloading does, without moving models back and forth:
        t2v keeps every model on the one device (its float16 weights take about 3.4 GB for the
        1.7B model). Without a GPU that this build can use, stays on the CPU (with a warning,
        as :meth:`to`)."""
        name = _device_name(device)
        if gpu_id is not None and ":" not in name:
            name = f"{name}:{int(gpu_id)}"
        self._set(device=self._open_device(name))

    def enable_sequential_cpu_offload(self, gpu_id: Optional[int] = None, device: Any = "cuda") -> None:
        """As :meth:`enable_model_cpu_offload`: t2v does not stream layers between devices."""
        self.enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def disable_model_cpu_offload(self) -> None:
        """No effect: t2v never offloads (see :meth:`enable_model_cpu_offload`)."""

    def disable_sequential_cpu_offload(self) -> None:
        """No effect: t2v never offloads (see :meth:`enable_model_cpu_offload`)."""

    def enable_vae_slicing(self) -> None:
        """No effect: t2v's VAE already decodes one frame at a time, so its memory does not
        grow with the number of frames."""

    def disable_vae_slicing(self) -> None:
        """No effect (see :meth:`enable_vae_slicing`)."""

    def enable_vae_tiling(self) -> None:
        """No effect: t2v decodes each frame whole; the frames of these models (256 to 576
        pixels a side) fit in memory one at a time."""

    def disable_vae_tiling(self) -> None:
        """No effect (see :meth:`enable_vae_tiling`)."""

    def enable_attention_slicing(self, slice_size: Any = "auto") -> None:
        """No effect: t2v's CPU attention already works through blocks of query rows and never
        holds a whole score matrix."""

    def disable_attention_slicing(self) -> None:
        """No effect (see :meth:`enable_attention_slicing`)."""

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """No effect: xformers is a torch library; t2v has its own attention kernels (see
        :meth:`enable_attention_slicing`)."""

    def disable_xformers_memory_efficient_attention(self) -> None:
        """No effect (see :meth:`enable_xformers_memory_efficient_attention`)."""

    def enable_freeu(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: raises NotImplementedError (FreeU changes the UNet's outputs)."""
        raise NotImplementedError("t2v does not implement FreeU")

    def disable_freeu(self) -> None:
        """No effect: FreeU is never on."""

    # -- long videos (FreeNoise, as diffusers' AnimateDiffFreeNoiseMixin) ------------------------

    def enable_free_noise(
        self,
        context_length: Optional[int] = 16,
        context_stride: int = 4,
        weighting_scheme: str = "pyramid",
        noise_type: str = "shuffle_context",
        prompt_interpolation_callback: Optional[Callable[..., Any]] = None,
    ) -> None:
        """Long videos with FreeNoise, as diffusers' ``enable_free_noise``: every temporal
        attention sees windows of ``context_length`` frames, ``context_stride`` apart, fused
        with ``weighting_scheme`` weights (``"pyramid"``, ``"flat"`` or
        ``"delayed_reverse_sawtooth"``), and the initial noise of the first window is reused,
        shuffled (``noise_type="shuffle_context"``, the only type t2v implements)."""
        allowed = ("flat", "pyramid", "delayed_reverse_sawtooth")
        if weighting_scheme not in allowed:
            raise ValueError(f"The parameter `weighting_scheme` must be one of {list(allowed)}, but got {weighting_scheme=}")
        if noise_type not in ("shuffle_context", "repeat_context", "random"):
            raise ValueError(f"The parameter `noise_type` must be one of ['shuffle_context', 'repeat_context', 'random'], but got {noise_type=}")
        if noise_type != "shuffle_context":
            raise NotImplementedError(f"t2v implements FreeNoise's noise_type='shuffle_context' only, not {noise_type!r}")
        if prompt_interpolation_callback is not None:
            raise NotImplementedError("t2v interpolates keyframe prompts linearly: prompt_interpolation_callback must be None")
        length = 16 if context_length is None else context_length
        for name, value in (("context_length", length), ("context_stride", context_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of frames, at least 1, got {value!r}")
        self._free_noise = dict(context_length=length, context_stride=context_stride, context_weighting=weighting_scheme)

    def disable_free_noise(self) -> None:
        """Turns FreeNoise off: temporal attention over the whole video again."""
        self._free_noise = None

    @property
    def free_noise_enabled(self) -> bool:
        return self._free_noise is not None

    def _long_settings(self) -> Dict[str, Any]:
        return dict(self._free_noise) if self._free_noise is not None else {}

    # -- the run -------------------------------------------------------------------------------

    def _check_run(
        self,
        prompt: Union[str, List[str], None],
        negative_prompt: Union[str, List[str], None],
        output_type: Optional[str],
        callback_steps: int,
        callback_on_step_end_tensor_inputs: Sequence[str],
        num_inference_steps: int,
        unsupported: Mapping[str, Any],
        cross_attention_kwargs: Optional[Dict[str, Any]],
    ) -> Tuple[List[str], List[Optional[str]], List[str]]:
        """The checks both pipelines make before any work; returns the prompts, their negative
        prompts and the tensors the step callback asks for."""
        refused = [name for name, value in unsupported.items() if value is not None]
        if cross_attention_kwargs:
            refused.append("cross_attention_kwargs")
        if refused:
            raise NotImplementedError(
                f"t2v does not support {', '.join(refused)}: it encodes the prompt itself and draws "
                "the initial latents from the generator's seed"
            )
        if prompt is None:
            raise ValueError("give a prompt: what the video should show")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives: List[Optional[str]] = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one a prompt")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}: use 'np', 'pil', 'pt' or 'latent'")
        if not isinstance(callback_steps, int) or callback_steps <= 0:
            raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ())
        if any(name != "latents" for name in tensor_inputs):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may name 'latents' only, got {tensor_inputs}: "
                "t2v gives step callbacks the latents"
            )
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps or num_inference_steps < 0:
            raise ValueError(f"num_inference_steps must be a whole number, got {num_inference_steps!r}")
        return prompts, negatives, tensor_inputs

    def _run(
        self,
        model: Any,
        prompts: List[str],
        negatives: List[Optional[str]],
        seeds: List[int],
        *,
        steps_run: int,
        output_type: Optional[str],
        return_dict: bool,
        callback: Optional[Callable[[int, int, Any], None]],
        callback_steps: int,
        callback_on_step_end: Optional[Callable[..., Any]],
        tensor_inputs: List[str],
        videos: Optional[List[np.ndarray]] = None,
        long: Optional[Dict[str, Any]] = None,
        **settings: Any,
    ) -> Any:
        """Runs the model once per prompt (on ``videos[i]`` for video-to-video) with the GIL
        released, reporting each step to the callbacks and the progress bar."""
        for text in prompts:
            for message in model.prompt_warnings(text):
                warnings.warn(message, UserWarning, stacklevel=3)

        self._interrupt = False
        want_latents = callback is not None or (callback_on_step_end is not None and bool(tensor_inputs))
        bar = self._progress_bar(steps_run * len(prompts))
        results = []
        try:
            for k, (text, negative, seed) in enumerate(zip(prompts, negatives, seeds)):

                def on_step(step: int, timestep: int, step_latents: Optional[np.ndarray]) -> bool:
                    if bar is not None:
                        bar.update(1)
                    if callback is not None and step % callback_steps == 0:
                        callback(step, timestep, step_latents)
                    if callback_on_step_end is not None:
                        kwargs = {"latents": step_latents} if tensor_inputs else {}
                        returned = callback_on_step_end(self, step, timestep, kwargs)
                        if returned is not None and not isinstance(returned, Mapping):
                            raise TypeError(
                                "callback_on_step_end must return callback_kwargs (a dict) or None, "
                                f"not {type(returned).__name__}"
                            )
                        given = (returned or {}).get("latents", step_latents)
                        if given is not step_latents and not np.array_equal(given, step_latents):
                            raise NotImplementedError(
                                "callback_on_step_end returned other latents: t2v does not take latents back"
                            )
                    return self._interrupt

                results.append(
                    model.generate(
                        text,
                        negative_prompt=negative,
                        seed=seed,
                        scheduler=self._scheduler._class_name,
                        scheduler_config=self._scheduler._config_json(),
                        on_step=on_step,
                        step_latents=want_latents,
                        latent=output_type == "latent",
                        video=None if videos is None else videos[k],
                        **settings,
                        **(long or {}),
                    )
                )
                if self._interrupt:
                    seeds = seeds[: len(results)]
                    break
        finally:
            if bar is not None:
                bar.close()

        if output_type == "latent":
            frames: Any = np.concatenate(results, axis=0)
        else:
            frames = np.stack(results, axis=0)
            if output_type == "pil":
                frames = _to_pil(frames)
            elif output_type == "pt":
                import torch

                frames = torch.from_numpy(frames).permute(0, 1, 4, 2, 3)
        if not return_dict:
            return (frames,)
        return TextToVideoSDPipelineOutput(frames=frames, seeds=seeds)

    def _progress_bar(self, total: int) -> Any:
        config = dict(self._progress_bar_config)
        if config.get("disable"):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        config.setdefault("total", total)
        return tqdm(**config)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name_or_path!r}, device={self._device!r}, dtype={self._dtype!r}, "
            f"scheduler={self._scheduler._class_name})"
        )


class TextToVideoSDPipeline(_ModelScopePipeline):
    """The ModelScope text-to-video pipeline (diffusers' ``TextToVideoSDPipeline``) on t2v.

    Make one with :meth:`from_pretrained`, then call it with a prompt::

        pipe = t2v.TextToVideoSDPipeline.from_pretrained("damo-vilab/text-to-video-ms-1.7b")
        pipe.scheduler = t2v.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        frames = pipe("Spiderman is surfing", num_inference_steps=25).frames[0]
        t2v.export_to_video(frames, "spiderman.mp4")

    The weights are read when the pipeline first runs, onto the device and in the dtype chosen by
    then (``from_pretrained(torch_dtype=...)``, :meth:`to`): nothing is loaded twice.
    """

    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: int = 16,
        num_inference_steps: int = 50,
        guidance_scale: float = 9.0,
        negative_prompt: Union[str, List[str], None] = None,
        eta: float = 0.0,
        generator: Any = None,
        latents: None = None,
        prompt_embeds: None = None,
        negative_prompt_embeds: None = None,
        output_type: Optional[str] = "np",
        return_dict: bool = True,
        callback: Optional[Callable[[int, int, Any], None]] = None,
        callback_steps: int = 1,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[..., Any]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Any:
        """Generates a video from a prompt (diffusers' ``TextToVideoSDPipeline.__call__``).

        The model runs with the GIL released (other Python threads go on), and Ctrl-C
        (KeyboardInterrupt) stops it after the current denoising step.

        Args:
            prompt: what the video shows (English), or a list of prompts (one video each).
            height: frame height in pixels, a multiple of the VAE's scale (8); default: the
                model's native size (256 for the 1.7B model).
            width: frame width in pixels, likewise.
            num_frames: the number of frames (16: two seconds at 8 frames a second).
            num_inference_steps: denoising steps (diffusers' default 50; 25 suffice with
                DPMSolverMultistepScheduler, the model card's recipe).
            guidance_scale: classifier-free guidance: how strongly to follow the prompt (at most
                1 turns guidance off and runs the UNet once a step).
            negative_prompt: what the video should not show (default: the empty prompt), or one
                per prompt.
            eta: DDIM's eta (0: deterministic); ignored by DPMSolverMultistepScheduler.
            generator: ``t2v.Generator("cpu").manual_seed(s)``, a ``torch.Generator`` (its
                ``initial_seed()``), an integer seed, or a list of those, one per prompt; None
                picks random seeds (``output.seeds`` tells which).
            latents: not supported: must be None (t2v draws the initial latents from the seed).
            prompt_embeds: not supported: must be None.
            negative_prompt_embeds: not supported: must be None.
            output_type: ``"np"`` (float32 (batch, frames, height, width, 3) in [0, 1]), ``"pil"``
                (lists of PIL images; needs Pillow), ``"pt"`` (a torch tensor (batch, frames, 3,
                height, width); needs torch) or ``"latent"`` (the final latents, numpy).
            return_dict: False returns the tuple ``(frames,)`` instead of the output object.
            callback: ``callback(step, timestep, latents)`` every ``callback_steps`` steps
                (latents: numpy (1, 4, frames, height / 8, width / 8)).
            callback_steps: how often ``callback`` runs.
            cross_attention_kwargs: not supported: must be None or empty.
            clip_skip: not supported: must be None.
            callback_on_step_end: ``callback_on_step_end(pipe, step, timestep, callback_kwargs)``
                after every step, as in diffusers' newer pipelines; ``callback_kwargs`` holds the
                latents (numpy) under ``"latents"``. Setting ``pipe._interrupt = True`` in it (or in
                ``callback``) stops the run after that step, decoding the latents reached. It may
                return ``callback_kwargs`` or None; returning other latents raises
                NotImplementedError (t2v does not take latents back).
            callback_on_step_end_tensor_inputs: which tensors ``callback_kwargs`` holds: only
                ``"latents"`` is available.

        Returns:
            :class:`TextToVideoSDPipelineOutput` (``.frames``), or ``(frames,)`` when
            ``return_dict`` is False.

        Raises:
            ValueError: a bad value (sizes, counts, scales, an unknown output type).
            KeyboardInterrupt: Ctrl-C during the run.
            NotImplementedError: an argument of diffusers that t2v does not support.
        """
        # Prompt travel: {frame: prompt} dicts, as diffusers' FreeNoise pipelines take them.
        prompt, keyframes = _keyframes(prompt, "prompt")
        negative_prompt, negative_keyframes = _keyframes(negative_prompt, "negative_prompt")
        prompts, negatives, tensor_inputs = self._check_run(
            prompt,
            negative_prompt,
            output_type,
            callback_steps,
            callback_on_step_end_tensor_inputs,
            num_inference_steps,
            {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
             "clip_skip": clip_skip},
            cross_attention_kwargs,
        )
        for name, value in (("height", height), ("width", width)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
                raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
        if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 0:
            raise ValueError(f"num_frames must be a whole number, got {num_frames!r}")

        seeds = seeds_for(generator, len(prompts))
        model = self._load()
        settings = dict(
            num_inference_steps=int(num_inference_steps),
            guidance_scale=float(guidance_scale),
            eta=float(eta),
            num_frames=int(num_frames),
            height=None if height is None else int(height),
            width=None if width is None else int(width),
        )
        long = dict(prompts=keyframes, negative_prompts=negative_keyframes, **self._long_settings())
        model.validate(**settings, **long)
        return self._run(
            model,
            prompts,
            negatives,
            seeds,
            steps_run=int(num_inference_steps),
            output_type=output_type,
            return_dict=return_dict,
            callback=callback,
            callback_steps=callback_steps,
            callback_on_step_end=callback_on_step_end,
            tensor_inputs=tensor_inputs,
            long=long,
            **settings,
        )


class VideoToVideoSDPipeline(_ModelScopePipeline):
    """The ModelScope video-to-video pipeline (diffusers' ``VideoToVideoSDPipeline``) on t2v: a
    video re-rendered following a prompt, as zeroscope's upscaling recipe does::

        pipe = t2v.VideoToVideoSDPipeline.from_pretrained("cerspense/zeroscope_v2_XL")
        pipe.scheduler = t2v.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        video = [frame.resize((1024, 576)) for frame in t2v.utils.load_video("low_res.mp4")]
        frames = pipe("Spiderman is surfing", video=video, strength=0.6).frames[0]
        t2v.export_to_video(frames, "spiderman_1024.mp4")

    The same checkpoint runs text-to-video and video-to-video:
    ``VideoToVideoSDPipeline.from_pipe(text_to_video_pipe)`` shares the loaded weights.
    """

    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        video: Any = None,
        strength: float = 0.6,
        num_inference_steps: int = 50,
        guidance_scale: float = 15.0,
        negative_prompt: Union[str, List[str], None] = None,
        eta: float = 0.0,
        generator: Any = None,
        latents: None = None,
        prompt_embeds: None = None,
        negative_prompt_embeds: None = None,
        output_type: Optional[str] = "np",
        return_dict: bool = True,
        callback: Optional[Callable[[int, int, Any], None]] = None,
        callback_steps: int = 1,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[..., Any]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        height: Optional[int] = None,
        width: Optional[int] = None,
    ) -> Any:
        """Re-renders a video following a prompt (diffusers' ``VideoToVideoSDPipeline.__call__``,
        with its defaults).

        The input frames are encoded by the VAE and noised to the timestep where ``strength``
        starts the schedule; the last ``int(num_inference_steps * strength)`` steps then run. The
        output has the input's frame count and size. The model runs with the GIL released, and
        Ctrl-C (KeyboardInterrupt) stops it after the current step.

        Args:
            prompt: what the video should show (English), or a list of prompts (one video each).
            video: the frames to re-render, as diffusers takes them: a list of PIL images (RGB), a
                list of numpy (height, width, 3) frames, a numpy (frames, height, width, 3) array,
                or a batch (videos, frames, height, width, 3) with one video per prompt (a torch
                tensor (frames, 3, height, width) works too). Float values are in [0, 1] (floats
                with negative values are taken as already in [-1, 1], as diffusers does, with a
                FutureWarning); uint8 values are divided by 255, as PIL images are. Sides must be
                multiples of the VAE's scale (8): like diffusers, t2v does not resize unless
                ``height``/``width`` ask it to.
            strength: how much of the video is replaced, 0 to 1 (1 ignores it); at least one step
                must run (``int(num_inference_steps * strength) >= 1``).
            num_inference_steps: the steps of the full schedule, of which the last
                ``int(num_inference_steps * strength)`` run.
            guidance_scale: classifier-free guidance (diffusers' default for this pipeline: 15).
            negative_prompt: what the video should not show, or one per prompt.
            eta: DDIM's eta (0: deterministic); ignored by DPMSolverMultistepScheduler.
            generator: a seed source as for :class:`TextToVideoSDPipeline` (``t2v.Generator``,
                ``torch.Generator``, an integer, or one per prompt); None picks random seeds.
            latents, prompt_embeds, negative_prompt_embeds, clip_skip: not supported: must be None.
            output_type: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``, as for
                :class:`TextToVideoSDPipeline`.
            return_dict: False returns the tuple ``(frames,)``.
            callback: ``callback(step, timestep, latents)`` every ``callback_steps`` steps that run.
            callback_steps: how often ``callback`` runs.
            cross_attention_kwargs: not supported: must be None or empty.
            callback_on_step_end: ``callback_on_step_end(pipe, step, timestep, callback_kwargs)``
                after every step that runs; ``pipe._interrupt = True`` stops after that step.
            callback_on_step_end_tensor_inputs: only ``"latents"``.
            height, width: (t2v's, keyword only) the frame size to re-render at: frames of another
                size are handed on as zeroscope's recipe does (8-bit, resized with the Lanczos
                filter), exactly as ``t2v generate --upscale`` does between its passes, so the
                upscale is one call on a first pass's frames::

                    low = t2v.TextToVideoSDPipeline.from_pretrained("cerspense/zeroscope_v2_576w")
                    frames = low(prompt, num_frames=24, height=320, width=576, generator=0).frames[0]
                    del low  # one model in memory at a time
                    xl = t2v.VideoToVideoSDPipeline.from_pretrained("cerspense/zeroscope_v2_XL")
                    video = xl(prompt, video=frames, strength=0.6, height=576, width=1024, generator=0)

                One of them alone keeps the other side of the video.

        Returns:
            :class:`TextToVideoSDPipelineOutput`: ``.frames`` float32 (batch, frames, height,
            width, 3) in [0, 1] with ``"np"``; or ``(frames,)`` when ``return_dict`` is False.

        Raises:
            ValueError: a bad value: a strength outside [0, 1] or one that runs no step, an empty
                video, frames of the wrong shape or of different sizes, an unknown output type.
            KeyboardInterrupt: Ctrl-C during the run.
            NotImplementedError: an argument of diffusers that t2v does not support.
        """
        prompts, negatives, tensor_inputs = self._check_run(
            prompt,
            negative_prompt,
            output_type,
            callback_steps,
            callback_on_step_end_tensor_inputs,
            num_inference_steps,
            {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
             "clip_skip": clip_skip},
            cross_attention_kwargs,
        )
        # diffusers' check_inputs.
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.number)) or not 0 <= strength <= 1:
            raise ValueError(f"The value of strength should in [0.0, 1.0] but is {strength}")
        size = None
        if height is not None or width is not None:
            for name, side in (("height", height), ("width", width)):
                if side is not None and (isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side <= 0):
                    raise ValueError(f"{name} must be a positive whole number of pixels, got {side!r}")
            size = (height, width)
        videos = _video_inputs(video, size)
        if len(videos) == 1:
            videos = videos * len(prompts)
        elif len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts: give one video, or one per prompt")

        seeds = seeds_for(generator, len(prompts))
        model = self._load()
        settings = dict(num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale), eta=float(eta))
        steps_run = 0
        for clip in videos:
            steps_run = model.validate_video(clip.shape, strength=float(strength), **settings)
        frames, height, width = videos[0].shape[:3]
        return self._run(
            model,
            prompts,
            negatives,
            seeds,
            steps_run=steps_run,
            output_type=output_type,
            return_dict=return_dict,
            callback=callback,
            callback_steps=callback_steps,
            callback_on_step_end=callback_on_step_end,
            tensor_inputs=tensor_inputs,
            videos=videos,
            strength=float(strength),
            num_frames=frames,
            height=height,
            width=width,
            **settings,
        )


def _keyframes(prompt: Any, name: str) -> Tuple[Any, Optional[Dict[int, str]]]:
    """A ``{frame: text}`` dict of keyframes split into frame 0's text and the later keyframes;
    anything else is returned as it is. A negative prompt dict without frame 0 starts from the
    empty prompt."""
    if not isinstance(prompt, dict):
        return prompt, None
    if not prompt or not all(isinstance(k, int) and not isinstance(k, bool) for k in prompt):
        raise ValueError(f"Expected integer keys in `{name}` dict for prompt travel, got {list(prompt)}")
    if not all(isinstance(v, str) for v in prompt.values()):
        raise ValueError(f"Expected str values in `{name}` dict for prompt travel.")
    if min(prompt) < 0:
        raise ValueError(f"The frames of the `{name}` dict are 0-based: got {min(prompt)}")
    if 0 not in prompt and name == "prompt":
        raise ValueError("The minimum frame index in `prompt` dict must be 0 as a starting prompt is necessary.")
    return prompt.get(0, ""), {k: v for k, v in prompt.items() if k != 0}


def _is_pil(value: Any) -> bool:
    return hasattr(value, "convert") and hasattr(value, "mode") and hasattr(value, "size")


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _frame_array(frame: Any) -> np.ndarray:
    """One frame as diffusers' image processor reads it: a PIL image becomes float32 / 255."""
    if _is_pil(frame):
        if frame.mode != "RGB":
            raise ValueError(f"video frames must be RGB images, got a {frame.mode} image: convert them with .convert('RGB')")
        return np.asarray(frame, dtype=np.uint8)
    if isinstance(frame, np.ndarray):
        return frame
    raise ValueError(
        f"video frames must be PIL images or numpy arrays, got {type(frame).__name__}"
    )


def _resized(clip: np.ndarray, size: Optional[Tuple[Optional[int], Optional[int]]]) -> np.ndarray:
    """``clip`` at ``size`` (height, width; None keeps a side) as t2v's library hands frames on
    between zeroscope's passes: 8-bit, resized with the Lanczos filter (uint8 out); unchanged when
    the size is already that."""
    if size is None:
        return clip
    height = size[0] if size[0] is not None else clip.shape[1]
    width = size[1] if size[1] is not None else clip.shape[2]
    if (height, width) == tuple(clip.shape[1:3]):
        return clip
    if clip.dtype == np.uint8:
        unit = clip.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(clip.dtype, np.floating):
        unit = clip.astype(np.float32)
        if unit.size and unit.min() < 0:
            unit = (unit + np.float32(1.0)) / np.float32(2.0)
    else:
        raise ValueError(f"video values must be floats in [0, 1] or uint8, got {clip.dtype}")
    return _t2v.first_pass_frames(np.ascontiguousarray(unit), int(height), int(width))


def _normalized(clip: np.ndarray, size: Optional[Tuple[Optional[int], Optional[int]]] = None) -> np.ndarray:
    """(frames, height, width, 3) in [-1, 1], float32, as diffusers' ``VideoProcessor.preprocess_video``
    makes it: ``2x - 1`` of values in [0, 1], computed in the array's own float type. With
    ``size`` the frames are first brought to it (see :func:`_resized`)."""
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(
            f"a video must be (frames, height, width, 3) RGB frames, got the shape {clip.shape}"
        )
    if clip.shape[0] == 0:
        raise ValueError("the video has no frames: give at least one")
    clip = _resized(clip, size)
    if clip.dtype == np.uint8:
        # As PIL images are read (pil_to_numpy): v / 255 in float32, then 2x - 1.
        # (diffusers leaves uint8 numpy arrays unscaled; t2v reads them as 8-bit pixels.)
        scaled = clip.astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray(np.float32(2.0) * scaled - np.float32(1.0))
    if not np.issubdtype(clip.dtype, np.floating):
        raise ValueError(f"video values must be floats in [0, 1] or uint8, got {clip.dtype}")
    if clip.min() < 0:
        warnings.warn(
            "Passing `video` with values in [-1, 1] is deprecated (as in diffusers): the expected range is "
            f"[0, 1]; these values, in [{clip.min()}, {clip.max()}], are used as they are",
            FutureWarning,
            stacklevel=4,
        )
        return np.ascontiguousarray(clip, dtype=np.float32)
    return np.ascontiguousarray(clip.dtype.type(2.0) * clip - clip.dtype.type(1.0), dtype=np.float32)


def _video_inputs(video: Any, size: Optional[Tuple[Optional[int], Optional[int]]] = None) -> List[np.ndarray]:
    """The videos of a call, each (frames, height, width, 3) float32 in [-1, 1]; the forms
    diffusers' ``VideoProcessor.preprocess_video`` takes; at ``size`` when given."""
    if video is None:
        raise ValueError("give the video to re-render: video=[frames] (PIL images or numpy arrays)")
    if _is_torch(video) or (isinstance(video, (list, tuple)) and video and _is_torch(video[0])):
        # torch's layouts: (frames, 3, H, W) and (videos, frames, 3, H, W), channels before the sides.
        tensors = list(video) if isinstance(video, (list, tuple)) else [video]
        arrays = [np.asarray(t.detach().cpu().float().numpy()) for t in tensors]
        if len(arrays) == 1 and arrays[0].ndim == 5:
            arrays = list(arrays[0])
        for a in arrays:
            if a.ndim != 4:
                raise ValueError(f"a video tensor must be (frames, 3, height, width), got the shape {a.shape}")
            if a.shape[1] == 4:
                raise NotImplementedError("t2v does not take latents as the video: give the frames")
        return [_normalized(np.moveaxis(a, 1, -1), size) for a in arrays]
    if isinstance(video, np.ndarray):
        if video.ndim == 5:
            return [_normalized(v, size) for v in video]
        if video.ndim == 3:
            return [_normalized(video[None], size)]
        return [_normalized(video, size)]
    if _is_pil(video):
        return [_normalized(_frame_array(video)[None], size)]
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise ValueError("the video has no frames: give at least one")
        if isinstance(video[0], (list, tuple)):
            return [_video_inputs(list(v), size)[0] for v in video]
        if isinstance(video[0], np.ndarray) and video[0].ndim == 4:
            return [_normalized(v, size) for v in video]
        frames = [_frame_array(f) for f in video]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise ValueError(f"all frames of a video must have one size, got the shapes {sorted(shapes)}")
        if len({f.dtype for f in frames}) > 1:
            raise ValueError("all frames of a video must have one type (uint8, or floats in [0, 1])")
        if frames[0].ndim != 3:
            raise ValueError(f"a frame must be (height, width, 3) RGB, got the shape {frames[0].shape}")
        return [_normalized(np.stack(frames), size)]
    raise ValueError(
        f"video must be a list of PIL images or numpy frames, or a numpy array, not {type(video).__name__}"
    )


def _to_pil(frames: np.ndarray) -> List[List[Any]]:
    try:
        import PIL.Image
    except ImportError:
        raise ImportError('output_type="pil" needs Pillow: pip install pillow') from None
    # diffusers' numpy_to_pil: round, then 8 bits.
    pixels = (frames * 255).round().astype(np.uint8)
    return [[PIL.Image.fromarray(frame) for frame in video] for video in pixels]


TextToVideoMSPipeline = TextToVideoSDPipeline
"""The model card's name for :class:`TextToVideoSDPipeline`."""


class DiffusionPipeline(TextToVideoSDPipeline):
    """diffusers' generic loader: ``DiffusionPipeline.from_pretrained(path)`` gives the pipeline
    the checkpoint names: a :class:`VideoToVideoSDPipeline` for a ``VideoToVideoSDPipeline``
    checkpoint, else a :class:`TextToVideoSDPipeline`."""

    @classmethod
    def _loads_as(cls, pipeline_class: str) -> type:
        return VideoToVideoSDPipeline if pipeline_class == "VideoToVideoSDPipeline" else TextToVideoSDPipeline
