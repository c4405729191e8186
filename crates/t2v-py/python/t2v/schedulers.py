"""The schedulers t2v implements, spelled as diffusers': configuration objects that a pipeline
runs with (``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``).

The stepping itself is the library's (it matches diffusers 0.42.1); these objects carry the
configuration, check it when they are made, and give the timesteps of a schedule."""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar, Dict, Mapping, Optional, Type, TypeVar, Union

import numpy as np

from . import _t2v

S = TypeVar("S", bound="SchedulerMixin")


class FrozenDict(dict):
    """A read-only dict whose keys are also attributes, as diffusers' ``scheduler.config``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the config has no key {name!r}") from None

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "a scheduler config cannot be changed: make a new scheduler with "
            "Scheduler.from_config(config, key=value)"
        )

    __setitem__ = __delitem__ = __setattr__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        return (FrozenDict, (dict(self),))


class SchedulerMixin:
    """What the t2v schedulers share: a checked configuration and the timesteps of a schedule."""

    _class_name: ClassVar[str]
    order: ClassVar[int] = 1
    # diffusers' Euler schedulers keep float32 timesteps (fractional for `linspace` spacing).
    _timestep_dtype: ClassVar[Any] = np.int64
    init_noise_sigma: float = 1.0

    def __init__(self, **config: Any) -> None:
        # Every keyword is a setting; the class's defaults fill (and `_use_default_values` lists)
        # the others, as diffusers' `register_to_config` keeps them.
        self._adopt(_t2v.scheduler_from_config(self._class_name, "{}", _to_json(config)))
        if "_diffusers_version" in config:
            self._config = FrozenDict({**self._config, "_diffusers_version": config["_diffusers_version"]})

    def _adopt(self, config_json: str) -> None:
        # The library builds the configuration (diffusers' from_config rule, one for every door)
        # and checks it; this object only keeps its answer.
        full = {key: _float_of(value) for key, value in json.loads(config_json).items()}
        self._config = FrozenDict(full)
        self.num_inference_steps: Optional[int] = None
        self.timesteps: np.ndarray = np.arange(0, int(full.get("num_train_timesteps", 1000)))[::-1].copy()

    @property
    def config(self) -> FrozenDict:
        """The configuration (read-only), as diffusers' ``scheduler.config``."""
        return self._config

    @classmethod
    def from_config(cls: Type[S], config: Union[Mapping[str, Any], "SchedulerMixin", None] = None, **kwargs: Any) -> S:
        """A scheduler of this class from another scheduler's configuration: keys this class does
        not know are dropped, missing ones take this class's defaults, and ``kwargs`` override
        keys (``DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver")``),
        as in diffusers.

        Raises:
            ValueError: a value this scheduler cannot use.
        """
        if isinstance(config, SchedulerMixin):
            config = config.config
        scheduler = cls.__new__(cls)
        scheduler._adopt(_t2v.scheduler_from_config(cls._class_name, _to_json(dict(config or {})), _to_json(kwargs)))
        return scheduler

    @classmethod
    def from_pretrained(
        cls: Type[S], pretrained_model_name_or_path: Union[str, "os.PathLike[str]"], subfolder: Optional[str] = None, **kwargs: Any
    ) -> S:
        """A scheduler from a ``scheduler_config.json``: in a folder, its ``subfolder``
        (``subfolder="scheduler"`` for a pipeline folder), or a Hugging Face repo id's."""
        root = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(root):
            root = os.fspath(_t2v.resolve_model(root))
        path = os.path.join(root, subfolder or "", "scheduler_config.json")
        if not os.path.isfile(path) and subfolder is None:
            path = os.path.join(root, "scheduler", "scheduler_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return cls.from_config(config, **kwargs)

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        """Sets ``timesteps`` (descending, int64) for a run of ``num_inference_steps`` steps.
        ``device`` is accepted for diffusers' spelling."""
        steps = _t2v.scheduler_timesteps(self._class_name, _to_json(self._config), int(num_inference_steps))
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = np.asarray(steps, dtype=self._timestep_dtype)

    def _config_json(self) -> str:
        return _to_json(self._config)

    def __repr__(self) -> str:
        return f"{self._class_name} {json.dumps(dict(self._config), indent=2, sort_keys=True)}"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and dict(other.config) == dict(self.config)  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class DDIMScheduler(SchedulerMixin):
    """DDIM (``diffusers.DDIMScheduler``): the scheduler the ModelScope checkpoints ship. ``eta``
    of the pipeline call adds fresh noise at each step (0: deterministic)."""

    _class_name = "DDIMScheduler"


class DPMSolverMultistepScheduler(SchedulerMixin):
    """Multistep DPM-Solver (``diffusers.DPMSolverMultistepScheduler``), DPM-Solver++ 2M by
    default: the model card's recipe, good videos in about 25 steps."""

    _class_name = "DPMSolverMultistepScheduler"


class LCMScheduler(SchedulerMixin):
    """Latent consistency sampling (``diffusers.LCMScheduler``): for distilled checkpoints and
    LoRAs (MCM, LCM-LoRA), about 4 steps at ``guidance_scale=1`` (one UNet call a step);
    ``LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=4)`` for MCM."""

    _class_name = "LCMScheduler"


class UniPCMultistepScheduler(SchedulerMixin):
    """UniPC (``diffusers.UniPCMultistepScheduler``): a multistep predictor-corrector, good
    videos in 10 to 20 steps."""

    _class_name = "UniPCMultistepScheduler"


class EulerDiscreteScheduler(SchedulerMixin):
    """Euler (``diffusers.EulerDiscreteScheduler``), deterministic."""

    _class_name = "EulerDiscreteScheduler"
    _timestep_dtype = np.float32


class EulerAncestralDiscreteScheduler(SchedulerMixin):
    """Euler ancestral (``diffusers.EulerAncestralDiscreteScheduler``): fresh noise from the
    run's generator at every step."""

    _class_name = "EulerAncestralDiscreteScheduler"
    _timestep_dtype = np.float32


SCHEDULERS: Dict[str, Type[SchedulerMixin]] = {
    cls._class_name: cls
    for cls in (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        LCMScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
    )
}


def as_scheduler(value: Any) -> SchedulerMixin:
    """A t2v scheduler for ``value``: a t2v scheduler, or a diffusers scheduler of a class that
    t2v implements (its configuration is taken over)."""
    if isinstance(value, SchedulerMixin):
        return value
    cls = SCHEDULERS.get(type(value).__name__)
    config = getattr(value, "config", None)
    if cls is not None and isinstance(config, Mapping):
        return cls.from_config(config)
    raise TypeError(
        f"t2v runs with {', '.join(SCHEDULERS)} (t2v.DDIMScheduler, t2v.LCMScheduler, ...), "
        f"not {type(value).__name__}"
    )


def _float_of(value: Any) -> Any:
    # The library writes non-finite floats as strings (JSON has no such numbers).
    if value in ("-Infinity", "Infinity", "NaN"):
        return float(value)
    return value


def _to_json(config: Mapping[str, Any]) -> str:
    # Python writes infinities as -Infinity, which the library reads (diffusers' files hold them).
    return json.dumps(dict(config), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    raise TypeError(f"a scheduler config value must be JSON data, got {type(value).__name__}")
