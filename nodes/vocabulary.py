"""What the nodes' combos offer and what each choice means, with the input checks the nodes share.

ComfyUI-free (the unit tests import it without a host). The server does not check V3 combo values, and it skips
its min/max checks for inputs that validate_inputs names, so the nodes check them here.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from ..jodi_core import imaging
from ..jodi_core.dit.attention import backend_names

ROLE_AUTO = "auto"
ROLE_CHOICES: tuple[str, ...] = (ROLE_AUTO, "generate", "condition", "ignore")
SAMPLERS: dict[str, str] = {"dpm++2m-flow": "dpmpp_2m", "euler-flow": "euler"}  # node label -> jodi_core name
DTYPE_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
from ..jodi_core.ops import WEIGHT_DTYPES as WEIGHT_DTYPE_CHOICES  # how weights are stored (core UNETLoader's choices)
ATTENTION_CHOICES: tuple[str, ...] = backend_names()  # the registry of jodi_core.dit.attention
ASPECT_AUTO = "auto (condition image, else width x height)"
ASPECT_CUSTOM = "width x height"
ASPECT_CHOICES: tuple[str, ...] = (ASPECT_AUTO, ASPECT_CUSTOM, *imaging.ASPECT_PRESETS)
DEMO_MODEL_CHOICE = "jodi-demo (built-in)"
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF  # torch.Generator.manual_seed takes 64-bit seeds


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def check_number(name: str, value, lo: float, hi: float, integer: bool = False):
    """Range check with a message naming the input."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not (lo <= value <= hi):  # also false for NaN
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value!r}.")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(value) if integer else float(value)


def validation(checks: Iterable[Callable[[], object]]) -> "bool | str":
    """What validate_inputs returns: True, or the message of the first check that raises ValueError."""
    try:
        for check in checks:
            check()
    except ValueError as e:
        return str(e)
    return True


def torch_dtype(choice: str) -> Optional[torch.dtype]:
    """``"auto"`` -> None (the caller picks), else the named dtype."""
    check_choice("dtype", choice, DTYPE_CHOICES)
    return {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def resolve_role(domain: str, choice: Optional[str], connected: bool) -> str:
    """One domain's role: ``auto`` is 'condition if an image is connected, else generate'."""
    choice = ROLE_AUTO if choice is None else check_choice(f"{domain}_role", choice, ROLE_CHOICES)
    if choice == ROLE_AUTO:
        return "condition" if connected else "generate"
    if choice == "condition" and not connected:
        raise ValueError(
            f"The {domain} role is 'condition' but no {domain} image is connected: connect one, or set the role "
            "to auto, generate or ignore."
        )
    return choice


def resolve_size(aspect: str, width: int, height: int, condition_size: Optional[tuple[int, int]], base_size: int,
                 multiple: int = 32) -> tuple[int, int]:
    """Output (height, width) of a run; the pipeline samples at the nearest official aspect bucket and resizes back.

    - auto: the first condition image's size, else width x height;
    - width x height: as given;
    - an aspect preset such as ``16:9``: the bucket size itself (scaled to the model's base size).
    """
    check_choice("aspect", aspect, ASPECT_CHOICES)
    if aspect == ASPECT_AUTO and condition_size is not None:
        return condition_size
    if aspect in (ASPECT_AUTO, ASPECT_CUSTOM):
        check_number("width", width, 1, 16384, integer=True)
        check_number("height", height, 1, 16384, integer=True)
        return int(height), int(width)
    return imaging.aspect_preset_size(aspect, base_size, multiple)
