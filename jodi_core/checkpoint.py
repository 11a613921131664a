"""Reading checkpoint files: the formats (safetensors, torch pickles read with ``weights_only=True``), model folders
with sharded weights, and the checks that a file is whole and safe to read.

Only files are read here; what the tensors are and how they become a model is :mod:`.loading`'s (and each model's
``keys`` module's) business.
"""

from __future__ import annotations

import logging
import os
import pickle
import json
import re
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Training checkpoints wrap the weights; the official Jodi.pth is ``{'state_dict': ..., 'state_dict_ema': ...}``
# (the plain weights come first, as the reference loads them; EMA-only files are read too).
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "state_dict_ema", "ema", "model_ema",
                 "ema_state_dict")
# Pickled data that torch's safe loader refuses by default although it only rebuilds arrays: the numpy RNG state
# the reference's training code stores next to the weights.
_NUMPY_DATA_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                       "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray", "numpy.dtype")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, of another model, or with wrong keys."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """A shard that a folder's index lists is not there (an interrupted download)."""


def read_state_dict(path: "str | os.PathLike", *, device: "str | torch.device" = "cpu") -> dict[str, torch.Tensor]:
    """Read all tensors of a checkpoint file.

    ``.safetensors`` is memory-mapped; ``.pth/.pt/.bin/.ckpt`` go through ``torch.load(weights_only=True, mmap=True)``
    so no arbitrary code runs and a large file is not copied into memory before it is used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"Checkpoint file is empty (0 bytes): {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        sd = _read_safetensors(path, device)
    elif suffix in PICKLE_SUFFIXES:
        sd = _read_pickle(path, device)
    else:
        raise CheckpointError(
            f"Unsupported checkpoint extension {suffix!r} for {path.name}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}."
        )
    if not sd:
        raise CheckpointError(f"Checkpoint {path.name} holds no tensors.")
    if all(k.startswith("module.") for k in sd):  # saved from a DataParallel / DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_metadata(path: "str | os.PathLike") -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty for other formats or files without any)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Checkpoint {path.name} is corrupt or truncated (safetensors: {e}).") from e


def _read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {path.name} is corrupt or truncated (safetensors: {e}).") from e


def _read_pickle(path: Path, device) -> dict[str, torch.Tensor]:
    # Zip archives are memory-mapped; legacy (pre-1.6) files cannot be, but read just as safely.
    obj = load_pickle_safely(path, device=device, mmap=zipfile.is_zipfile(path))
    return unwrap_state_dict(obj, name=path.name)


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs Python objects beyond tensors, plain containers and numpy arrays: refused unread, since
    unpickling them could run any code. ``globals`` names what it asked for, where known."""

    def __init__(self, message: str, globals: Sequence[str] = ()):
        super().__init__(message)
        self.globals = tuple(globals)


def load_pickle_safely(path: "str | os.PathLike", *, device: "str | torch.device" = "cpu", mmap: bool = False,
                       numpy_arrays: bool = True):
    """``torch.load(weights_only=True)``: tensors and plain containers only, so no code in the file can run.

    ``numpy_arrays``: also rebuild numpy arrays (the numpy RNG state training code stores), through an allowlist of
    numpy's array and dtype types and nothing callable beyond them. Errors name the file and the cause; a refused
    file gets :class:`UnsafeCheckpointError`. No message passes on torch's advice to retry with
    ``weights_only=False``, which would run whatever the file holds.
    """
    path = Path(path)
    try:
        return torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, zip errors) for bad files
        error = e
    blocking = _unsafe_globals(path) or _globals_named_in(error)
    if blocking and numpy_arrays and all(_is_numpy_data(g) for g in blocking):
        try:
            with torch.serialization.safe_globals(_numpy_data_types()):
                return torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
        except Exception as e:
            reason = load_error_reason(e)
            raise CheckpointError(f"Checkpoint {path.name} could not be read safely ({reason}).") from None
    if blocking:
        raise UnsafeCheckpointError(
            f"Checkpoint {path.name} holds pickled objects that cannot be read safely ({', '.join(blocking[:5])}"
            f"): loading them could run code, so it is refused. Save its state dict alone, e.g. as .safetensors, "
            f"and load that.", blocking) from None
    if _is_weights_only_refusal(error) and not _OPCODE_IN_MESSAGE.search(str(error)):  # (opcodes: not a torch file)
        raise UnsafeCheckpointError(
            f"Checkpoint {path.name} holds pickled data that cannot be read safely ({load_error_reason(error)}), so "
            f"it is refused. Save its state dict alone, e.g. as .safetensors, and load that.") from None
    # torch's own text is kept as the cause only where it carries no weights_only advice
    cause = None if _is_weights_only_refusal(error) else error
    raise CheckpointError(f"Checkpoint {path.name} is corrupt, truncated or not a torch file "
                          f"({load_error_reason(error)}).") from cause


# torch's refusal text suggests re-running with weights_only=False or allowlisting the class: both run the file's
# code. Our messages keep only what the file asked for.
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_OPCODE_IN_MESSAGE = re.compile(r"Unsupported operand (\d+)")


def _is_weights_only_refusal(error: BaseException) -> bool:
    return isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error).lower()


def _globals_named_in(error: BaseException) -> list[str]:
    return list(dict.fromkeys(_GLOBAL_IN_MESSAGE.findall(str(error)))) if _is_weights_only_refusal(error) else []


def load_error_reason(error: BaseException) -> str:
    """One line on why ``torch.load`` failed, without torch's hints (never "weights_only=False")."""
    if _is_weights_only_refusal(error):
        names = _globals_named_in(error)
        if names:
            return f"it asks for {', '.join(names[:5])}"
        opcode = _OPCODE_IN_MESSAGE.search(str(error))
        if opcode:
            return f"pickle instruction {opcode.group(1)}, which torch's tensor files do not use"
        return "pickled data other than tensors and plain containers"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _unsafe_globals(path: Path) -> list[str]:
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None or not zipfile.is_zipfile(path):
        return []
    try:
        return list(finder(str(path)))
    except Exception:  # a corrupt archive: reported by the caller
        return []


def _is_numpy_data(name: str) -> bool:
    return name in _NUMPY_DATA_GLOBALS or (name.startswith("numpy.dtypes.") and name.endswith("DType"))


def _numpy_data_types() -> list:
    """What rebuilding numpy arrays takes (array and dtype classes, the reconstruct function), nothing callable
    beyond that."""
    import importlib

    import numpy as np

    allowed = [np.ndarray, np.dtype]
    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"  # numpy 2 deprecates numpy.core
    for attr in ("_reconstruct", "scalar"):
        allowed.append(getattr(importlib.import_module(f"{core}.multiarray"), attr))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def unwrap_state_dict(obj, *, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a training checkpoint (``{'state_dict': ...}`` and friends)."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        # A wrapper key wins even next to loose tensors (a step counter, say): weights never sit under these names.
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} does not contain a state dict (found {type(obj).__name__}).")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        nested = [k for k, v in obj.items() if isinstance(v, Mapping) and any(isinstance(x, torch.Tensor)
                                                                              for x in v.values())]
        if {"transformer", "dcae"} <= set(nested):
            raise CheckpointError(f"{name} is a training checkpoint of jodi_core.jobs.train; load the "
                                  f"jodi.safetensors and dcae.safetensors the run exported next to it.")
        hint = f"; tensors sit under {nested[:4]}" if nested else ""
        raise CheckpointError(f"{name} contains no tensors at its top level (keys: {sorted(map(str, obj))[:8]}"
                              f"{hint}).")
    return sd


def weights_file(path: "str | os.PathLike") -> str:
    """``path`` itself, or for a model folder (the DC-AE's, original or diffusers) the weights file inside it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    for candidate in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
        if os.path.isfile(os.path.join(path, candidate)):
            return os.path.join(path, candidate)
    raise CheckpointError(f"No model.safetensors or diffusion_pytorch_model.safetensors in folder {path}.")


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face model folders: one weights file, or shards listed in an index json
# ---------------------------------------------------------------------------------------------------------------------

SHARD_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _shard_index(folder: Path) -> Optional[tuple[str, dict[str, str]]]:
    """The first index json of ``folder`` as (its name, its tensor -> shard map); None without one."""
    for index_name in SHARD_INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e}).") from e
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} is not a valid shard index (its weight_map is empty).")
            return index_name, weight_map
    return None


def find_weight_files(folder: "str | os.PathLike", *, any_name: bool = False) -> list[Path]:
    """The weight files of a model folder: the shards its index lists (all of them must be there), else
    ``model.safetensors`` / ``pytorch_model.bin``, else with ``any_name`` every ``*.safetensors`` (or ``*.bin``).
    Empty when there are none."""
    folder = Path(folder)
    index = _shard_index(folder)
    if index is not None:
        index_name, weight_map = index
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MissingShardError(
                f"{folder.name}: shard(s) listed in {index_name} are missing: {', '.join(missing)}.")
        return [folder / s for s in shards]
    for name in SINGLE_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    if any_name:
        return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return []


def iter_shards(folder: "str | os.PathLike", files: Sequence[Path]) -> Iterator[dict[str, torch.Tensor]]:
    """Read ``files`` (from :func:`find_weight_files`) one at a time, so a caller can convert each shard before the
    next is read. A tensor in two shards is an error, and so, after the last shard, is one the index lists that no
    shard held (a truncated download)."""
    folder = Path(folder)
    seen: set[str] = set()
    for path in files:
        shard = read_state_dict(path)
        twice = seen.intersection(shard)
        if twice:
            raise CheckpointError(f"{path}: key {min(twice)} appears in more than one shard.")
        seen.update(shard)
        yield shard
        del shard  # one shard in memory at a time, for callers that convert each before the next
    index = _shard_index(folder)
    if index is not None:
        index_name, weight_map = index
        absent = [k for k in weight_map if k not in seen]
        if absent:
            raise CheckpointError(
                f"{folder.name}: {len(absent)} tensor(s) listed in {index_name} are not in the shards "
                f"(truncated download?), e.g. {absent[0]!r}."
            )
