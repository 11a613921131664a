"""Training checkpoints: what ``<output_dir>/last.pt`` holds (models, optimizers, stage, step, RNG states), reading
it back safely (:func:`read_training_state`: ``weights_only=True``, so a crafted file cannot run code) and the
safetensors exports of the trained models (:func:`save_safetensors`)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ...atomic import atomic_path


# last.pt holds tensors and plain containers only (no numpy arrays, no classes), so it is read with
# torch.load(weights_only=True) and a crafted file cannot run code on resume.
CHECKPOINT_FORMAT = "jodi_core.train/2"
_CHECKPOINT_KEYS = ("stage", "step", "dcae", "transformer", "dcae_opt", "dit_opt")


def rng_state() -> dict:
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    numpy_state = {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # (older checkpoints hold numpy's own tuple)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # (all training noise comes from per-step generators)
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def read_training_state(path: "str | Path") -> dict:
    """A ``last.pt`` of :class:`~.trainer.Trainer`, read safely: tensors and plain containers only
    (``weights_only=True``).

    Files of the previous format, whose numpy RNG state is a pickled array, are read through the same narrow numpy
    allowlist as reference checkpoints (:func:`checkpoint.load_pickle_safely`). Anything else that needs Python
    objects is refused unread, and a file that is not one of our checkpoints gets a clear error.
    """
    from ...checkpoint import CheckpointError, UnsafeCheckpointError, load_pickle_safely

    path = Path(path)
    restart = (f"Move it out of {path.parent} to start the run afresh, or start a new run from the weights it "
               f"exported (transformer_checkpoint = jodi.safetensors, dcae_checkpoint = dcae.safetensors).")
    try:
        state = load_pickle_safely(path, device="cpu")
    except UnsafeCheckpointError as e:
        what = f" ({', '.join(e.globals[:5])})" if e.globals else ""
        raise CheckpointError(
            f"{path} is not a training checkpoint that can be resumed safely: it holds pickled Python objects{what} "
            f"that jodi_core never writes there, and unpickling them could run code, so it was not loaded. "
            f"{restart}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path} cannot be resumed from: {e} {restart}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        found = f"keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a jodi_core training checkpoint (no {missing[0]!r}; found {found}). "
                              f"{restart}")
    if state.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state['format']!r}; this jodi_core reads "
                              f"{CHECKPOINT_FORMAT!r}. {restart}")
    return state


def save_safetensors(module: nn.Module, path: Path, metadata: dict) -> None:
    """Write ``module``'s weights to ``path`` all at once: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
