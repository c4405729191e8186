"""Seeds for the initial noise, spelled as torch's ``torch.Generator``."""

from __future__ import annotations

import secrets
import warnings
from typing import Any, List, Sequence, Union

# torch.Generator() starts from this seed until manual_seed() is called.
DEFAULT_SEED = 67280421310721

_U64 = 1 << 64


class Generator:
    """A seed for the initial noise, as ``torch.Generator("cpu").manual_seed(seed)``.

    t2v draws its noise exactly as torch's CPU generator does, so ``generator=
    t2v.Generator("cpu").manual_seed(7)`` gives the latents that diffusers starts from with
    ``torch.Generator("cpu").manual_seed(7)``.

    Unlike torch's, a t2v generator does not advance: every run starts from the generator's
    seed. Passing the same generator to a second run repeats the first run's noise (and warns);
    call :meth:`manual_seed` with another seed for another video.

    Args:
        device: accepted for torch's spelling (``"cpu"``, ``"cuda"``, ...); the noise is always
            torch's CPU stream (a ``torch.Generator("cuda")`` draws other numbers).
    """

    def __init__(self, device: Any = "cpu") -> None:
        self.device = str(device)
        self._seed = DEFAULT_SEED
        self._used = False

    def manual_seed(self, seed: int) -> "Generator":
        """Sets the seed (an integer, as torch takes it) and returns the generator."""
        self._seed = _check_seed(seed)
        self._used = False
        return self

    def seed(self) -> int:
        """Sets a nondeterministic seed and returns it."""
        self._seed = secrets.randbits(63)
        self._used = False
        return self._seed

    def initial_seed(self) -> int:
        """The seed the noise is drawn from."""
        return self._seed

    def __repr__(self) -> str:
        return f"t2v.Generator(device={self.device!r}, seed={self._seed})"


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            seed = int(seed.__index__())
        except (AttributeError, TypeError):
            raise TypeError(f"a seed is an integer, got {type(seed).__name__}") from None
    # torch accepts [-2^63, 2^64) and reads negative seeds modulo 2^64.
    if not -(1 << 63) <= seed < _U64:
        raise ValueError(f"a seed must lie in [-2**63, 2**64), got {seed}")
    return seed % _U64


def random_seed() -> int:
    """A fresh seed for a run without a generator (short enough to retype)."""
    return secrets.randbits(32)


GeneratorLike = Union[Generator, int, Any]


def seed_of(generator: GeneratorLike) -> int:
    """The seed of a ``t2v.Generator``, a ``torch.Generator`` (its ``initial_seed()``) or an int."""
    if generator is None:
        return random_seed()
    if isinstance(generator, Generator):
        if generator._used:
            warnings.warn(
                "this t2v.Generator was already used by a run: t2v starts every run from the "
                "generator's seed, so this run repeats that noise; call manual_seed() with another "
                "seed for another video",
                UserWarning,
                stacklevel=4,
            )
        generator._used = True
        return generator.initial_seed()
    if isinstance(generator, int) and not isinstance(generator, bool):
        return _check_seed(generator)
    initial_seed = getattr(generator, "initial_seed", None)
    if callable(initial_seed):
        device = str(getattr(generator, "device", "cpu"))
        if not device.startswith("cpu"):
            warnings.warn(
                f"a torch.Generator on {device} draws other noise than torch's CPU generator; t2v "
                "draws the CPU stream of its seed, so the video matches diffusers' with "
                'torch.Generator("cpu").manual_seed(seed)',
                UserWarning,
                stacklevel=4,
            )
        return _check_seed(initial_seed())
    raise TypeError(
        "generator must be a t2v.Generator, a torch.Generator or an integer seed, got "
        f"{type(generator).__name__}"
    )


def seeds_for(generator: Union[GeneratorLike, Sequence[GeneratorLike], None], batch: int) -> List[int]:
    """One seed per video of a batch: a list of generators gives one each; one generator serves
    a batch of one only (diffusers draws a whole batch from one generator's stream, which t2v,
    running the videos one by one, does not reproduce)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(
                f"{len(generator)} generators were given for {batch} prompts: give one generator a prompt"
            )
        # Plain loops: a comprehension's frame would shift the warnings' stacklevel.
        seeds = []
        for g in generator:
            seeds.append(seed_of(g))
        return seeds
    if generator is not None and batch > 1:
        raise ValueError(
            f"one generator for {batch} prompts: pass a list of {batch} generators (one a prompt), "
            "or None for random seeds"
        )
    seeds = []
    for _ in range(batch):
        seeds.append(seed_of(generator))
    return seeds

