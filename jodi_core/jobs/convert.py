"""``python -m jodi_core convert IN OUT --dtype fp8_e4m3fn|fp8_e5m2|bf16|fp16``: a Jodi DiT file, a DC-AE file (or
folder, either key format) or a Janus model folder, rewritten in another dtype.

The model is loaded with the normal loaders and its state dict written as safetensors, with its config in the
metadata (as training's exports and the demo files carry it), so the output loads with the same loaders. fp8 outputs
store the Linear and Conv2d weights in fp8 and everything else (norms, embeddings, biases, depthwise convs, the
first and last layers) in 16 bits: fp16 when the source is fp16, else bf16. ``layout="scaled"`` (the default) writes
ComfyUI's scaled-fp8 layout (a power-of-two ``scale_weight`` per layer and the ``scaled_fp8`` marker), ``"plain"``
casts the weights as they are (smaller values lose more precision).

A Janus output is a folder: ``model.safetensors`` in the original key layout (without the parts this pack does not
run: the VQ encoder and SigLIP's pooling head) and the source folder's other files (config, tokenizer, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .. import fp8, ops
from ..checkpoint import CheckpointError, read_metadata, read_state_dict, weights_file

log = logging.getLogger(__name__)

__all__ = ["CONVERT_DTYPES", "convert", "checkpoint_kind"]

CONVERT_DTYPES = ("fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16")
LAYOUTS = ("scaled", "plain")
_FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Files of a Janus folder that the converted weights replace.
_JANUS_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_JANUS_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_kind(path: "str | os.PathLike") -> str:
    """``"jodi"``, ``"dcae"`` or ``"janus"`` for a file or folder that :func:`convert` takes."""
    from ..loading import identify_checkpoint

    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return "janus"
    sd, _ = fp8.split_scales(read_state_dict(weights_file(path)))
    kind = identify_checkpoint(sd)
    if kind == "jodi":
        return "jodi"
    if kind in ("dcae", "dcae-diffusers"):
        return "dcae"
    what = f"it looks like {kind}" if kind else "its keys are not recognised"
    raise CheckpointError(f"{path.name} is neither a Jodi DiT, a DC-AE nor a Janus folder: {what}.")


def _rest_dtype(sd) -> torch.dtype:
    """The 16-bit dtype an fp8 output keeps its other tensors in: the source's fp16, else bf16."""
    return torch.float16 if fp8.unquantized_dtype(fp8.split_scales(sd)[0]) == torch.float16 else torch.bfloat16


def convert(src: "str | os.PathLike", dst: "str | os.PathLike", dtype: str, *, layout: str = "scaled") -> Path:
    """Write ``src`` (Jodi DiT file, DC-AE file or folder, Janus folder) to ``dst`` in ``dtype``; returns the path
    written (a ``.safetensors`` file, or for Janus the folder)."""
    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {', '.join(CONVERT_DTYPES)}.")
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}.")
    src, dst = Path(src), Path(dst)
    kind = checkpoint_kind(src)
    if dtype in _FLOAT_DTYPES:
        load_kw = dict(dtype=_FLOAT_DTYPES[dtype])
    else:  # CastOps layers hold a scale; plain torch layers do not, so the loader casts their weights as they are
        load_kw = dict(weight_dtype=dtype, operations=None if layout == "scaled" else torch.nn)

    if kind == "janus":
        return _convert_janus(src, dst, dtype, layout, load_kw)
    from ..loading import load_dcae, load_jodi

    if dst.suffix.lower() not in (".safetensors", ".sft"):
        raise ValueError(f"The output of a {kind} conversion is a .safetensors file, got {dst.name!r}.")
    source = weights_file(src)
    if Path(source).resolve() == dst.resolve():
        raise ValueError("convert would overwrite its input; give another output path.")
    if "dtype" not in load_kw:
        load_kw["dtype"] = _rest_dtype(read_state_dict(source))
    metadata = {k: v for k, v in read_metadata(source).items() if k != "format"}
    if kind == "jodi":
        model = load_jodi(source, **load_kw)
    else:
        model = load_dcae(source, **load_kw)
        metadata["scaling_factor"] = str(model.config.scaling_factor)
    metadata["config"] = json.dumps(dataclasses.asdict(model.config))
    _save(model, dst, metadata, dtype, layout)
    return dst


def _save(model: torch.nn.Module, path: Path, metadata: dict, dtype: str, layout: str) -> None:
    from .train.checkpoints import save_safetensors

    metadata = {"format": "pt", **metadata, "jodi_dtype": dtype}
    storage = ops.storage_dtype(dtype) if dtype not in _FLOAT_DTYPES else None
    extra = {}
    if storage is not None and layout == "scaled":
        # ComfyUI's marker: its dtype names the format; no elements = its fp8 matmuls may be used
        extra[fp8.SCALED_FP8_MARKER] = torch.empty(0, dtype=storage)
    holder = _WithExtra(model, extra)
    save_safetensors(holder, path, metadata)
    stored = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    log.info("wrote %s (%s, %.1f MB of tensors)", path, dtype, stored / 2**20)


class _WithExtra(torch.nn.Module):
    """``model``'s state dict plus a few extra tensors, for :func:`.train.checkpoints.save_safetensors`."""

    def __init__(self, model: torch.nn.Module, extra: dict):
        super().__init__()
        self.model, self.extra = model, extra

    def state_dict(self, *args, **kwargs):
        return {**self.model.state_dict(), **self.extra}


def _janus_weights(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.name.endswith(_JANUS_WEIGHT_SUFFIXES) or p.name in _JANUS_WEIGHT_INDEXES)


def _convert_janus(src: Path, dst: Path, dtype: str, layout: str, load_kw: dict) -> Path:
    from ..janus.loading import load_janus, read_janus_state_dict

    if dst.exists() and not dst.is_dir():
        raise ValueError(f"The output of a Janus conversion is a folder; {dst} is a file.")
    if dst.resolve() == src.resolve():
        raise ValueError("convert would overwrite its input folder; give another output folder.")
    if dst.is_dir() and set(_janus_weights(dst)) - {"model.safetensors"}:  # the loader could pick those instead
        raise ValueError(f"The output folder {dst} already holds weights ({', '.join(_janus_weights(dst))}); "
                         f"give an empty or new folder.")
    if "dtype" not in load_kw:
        load_kw["dtype"] = _rest_dtype(read_janus_state_dict(src)[0])
    model = load_janus(src, **load_kw)
    dst.mkdir(parents=True, exist_ok=True)
    weights = set(_janus_weights(src))
    for item in src.iterdir():  # config, tokenizer, preprocessor config, ...: not the weights being replaced
        if item.is_file() and item.name not in weights:
            shutil.copyfile(item, dst / item.name)
    metadata = {"config": json.dumps(model.config.to_dict()), "source": src.name}
    _save(model, dst / "model.safetensors", metadata, dtype, layout)
    return dst
