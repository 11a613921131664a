"""Glue shared by the Jodi and Janus nodes: socket types, model files, model loading into ComfyUI ModelPatchers,
ComfyUI memory management, progress and previews.

Only ComfyUI plumbing lives here; everything model-related is in jodi_core. Heavy jodi_core modules (model code,
Triton kernels) are imported inside functions, so importing the pack stays cheap.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from comfy_api.v0_0_2 import io

from ..jodi_core import ops as core_ops
from ..jodi_core.domains import DOMAIN_NAMES, DOMAINS
from . import vocabulary

log = logging.getLogger(__name__)

# Socket types. JODI_VAE is the DC-AE: core's VAE type would let users plug an SD VAE into Jodi, or the DC-AE into
# core VAEDecode; neither works, so the type keeps those links from being drawn.
JodiModel = io.Custom("JODI_MODEL")
JodiVAE = io.Custom("JODI_VAE")
JodiRolesType = io.Custom("JODI_ROLES")
JodiLatentType = io.Custom("JODI_LATENT")

JODI_FOLDERS = ("jodi", "diffusion_models")  # where Jodi DiT checkpoints are listed from, in lookup order
VAE_FOLDER = "vae"

DOMAIN_TOOLTIPS = {d.name: d.description for d in DOMAINS}


def _folder_paths():
    import folder_paths  # ComfyUI's; imported late so this module imports under a test stub too

    return folder_paths


# ---------------------------------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------------------------------


def folder_roots(name: str) -> list[Path]:
    """The folders a ComfyUI model folder name stands for (models/<name> plus extra_model_paths.yaml), in lookup
    order; none while the name is not registered."""
    entry = _folder_paths().folder_names_and_paths.get(name)
    return [Path(p) for p in (entry[0] if entry else [])]


def _list_folder(name: str) -> list[str]:
    try:
        return list(_folder_paths().get_filename_list(name))
    except KeyError:  # folder name not registered (the pack's __init__ registers 'jodi')
        return []


def dit_choices() -> list[str]:
    names: list[str] = []
    for folder in JODI_FOLDERS:
        names += [n for n in _list_folder(folder) if n not in names]
    return [vocabulary.DEMO_MODEL_CHOICE, *sorted(names)]


def vae_choices() -> list[str]:
    return [vocabulary.DEMO_MODEL_CHOICE, *sorted(_list_folder(VAE_FOLDER))]


def demo_paths() -> tuple[str, str]:
    """(dit, vae) files of the built-in demo model; FileNotFoundError where this checkout has none."""
    from ..jodi_core.jobs import demo

    dit, vae = demo.demo_model_paths()
    return str(dit), str(vae)


def resolve_dit_path(name: str) -> str:
    if name == vocabulary.DEMO_MODEL_CHOICE:
        return demo_paths()[0]
    for folder in JODI_FOLDERS:
        path = _folder_paths().get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(
        f"Jodi checkpoint {name!r} was not found in models/jodi or models/diffusion_models (or the folders that "
        "extra_model_paths.yaml adds); refresh the node list or check the file name."
    )


def resolve_vae_path(name: str) -> str:
    if name == vocabulary.DEMO_MODEL_CHOICE:
        return demo_paths()[1]
    path = _folder_paths().get_full_path(VAE_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"DC-AE file {name!r} was not found in models/vae; refresh the node list.")
    return path


def file_fingerprint(path_resolver, name: str, folder_suffixes: Sequence[str] = ()):
    """Changes when the file behind a combo entry changes, so a replaced checkpoint is reloaded. A model folder:
    when one of its files ending in ``folder_suffixes`` changes (a replaced or completed download)."""
    try:
        path = path_resolver(name)
        if os.path.isdir(path):
            files = [p for p in Path(path).iterdir() if p.suffix in folder_suffixes]
            return f"{path}:{sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)}"
        st = os.stat(path)
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except (OSError, ValueError):
        return name  # validation/execution reports the problem


# ---------------------------------------------------------------------------------------------------------------------
# Memory management: jodi_core modules wrapped in ComfyUI ModelPatchers
# ---------------------------------------------------------------------------------------------------------------------


class ManagedModule(torch.nn.Module):
    """What the ModelPatcher holds: a plain container around a jodi_core module.

    ModelPatcher writes bookkeeping attributes onto the module it manages (``device``, ``model_lowvram``, ...).
    jodi_core modules expose ``device``/``dtype`` as read-only properties, so they are wrapped instead of patched.
    ``host_ops``: the module's layers are ComfyUI's comfy.ops, so the patcher may hold weights apart and cast them
    on use; ``manual_cast_dtype``: the compute dtype where weights are stored in another one (fp8), which ComfyUI
    reads to size the cast buffers of offloaded layers.
    """

    def __init__(self, module: torch.nn.Module, host_ops: bool = False,
                 manual_cast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.module = module
        self.host_ops = host_ops
        self.manual_cast_dtype = manual_cast_dtype

    def get_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def unwrap(patcher) -> torch.nn.Module:
    """The jodi_core module behind a patcher from the Jodi loaders."""
    model = patcher.model
    return model.module if isinstance(model, ManagedModule) else model


def _pick_dtype(choice: str, auto_dtype: Callable[[], torch.dtype]) -> torch.dtype:
    dtype = vocabulary.torch_dtype(choice) or auto_dtype()
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        # fp8/fp64 flags of ComfyUI are for its own models; fp8 storage is the loaders' weight_dtype.
        log.warning("Jodi: dtype %s from ComfyUI's flags is not supported; using float32.", dtype)
        dtype = torch.float32
    return dtype


def storage_dtype(weight_dtype: str) -> Optional[torch.dtype]:
    """The dtype weights are stored in for a ``weight_dtype`` choice; None for "default" (the compute dtype)."""
    vocabulary.check_choice("weight_dtype", weight_dtype, vocabulary.WEIGHT_DTYPE_CHOICES)
    return core_ops.storage_dtype(weight_dtype)


def host_operations(weight_dtype: str, compute_dtype: torch.dtype, load_device):
    """ComfyUI's layer classes for a model stored as ``weight_dtype`` and computed in ``compute_dtype``, picked as
    core's diffusion-model loader picks them (comfy.ops.pick_operations: plain layers when both dtypes agree, cast
    on use when they differ, fp8 matmuls for ``fp8_e4m3fn_fast`` where the card has them); None without comfy.ops."""
    try:
        import comfy.ops
    except ImportError:
        return None
    storage = storage_dtype(weight_dtype) or compute_dtype
    fast = weight_dtype == "fp8_e4m3fn_fast"
    if fast:
        import comfy.model_management as mm

        supported = getattr(mm, "supports_fp8_compute", lambda device=None: False)(load_device)
        if not supported:
            log.info("Jodi: %s has no fp8 matmuls; fp8_e4m3fn_fast stores fp8 weights and computes in %s.",
                     load_device, compute_dtype)
    # Keywords only: the positional parameters after load_device differ between ComfyUI versions.
    return comfy.ops.pick_operations(storage, compute_dtype, load_device=load_device, fp8_optimizations=fast)


def load_patcher(load, path, dtype_choice: str, devices: tuple, auto_dtype: Callable, what: str,
                 weight_dtype: str = "default"):
    """A jodi_core module from ``load(path, dtype=, device=, weight_dtype=, operations=)``, on ``devices`` = (load
    device, offload device), in a ModelPatcher: ComfyUI moves it to the load device when a node uses it.
    ``auto_dtype(load_device)``: the compute dtype the 'auto' choice means for this model; ``weight_dtype``: how the
    weights are stored; ``what``: the model's name in the log.

    Built from comfy.ops, the model is managed like core's models: loaded
    partially when VRAM is short, the rest cast on use, and on hosts with dynamic VRAM (0.33) through its patcher."""
    import comfy.model_patcher

    load_device, offload_device = devices
    dtype = _pick_dtype(dtype_choice, lambda: auto_dtype(load_device))
    storage = storage_dtype(weight_dtype)
    ops = host_operations(weight_dtype, dtype, load_device)
    module = load(path, dtype=dtype, device=offload_device, weight_dtype=weight_dtype, operations=ops).eval()
    managed = ManagedModule(module, host_ops=ops is not None,
                            manual_cast_dtype=dtype if storage not in (None, dtype) else None)
    log.info("%s: loaded %s (%s%s%s) for %s", what, os.path.basename(path), dtype,
             f", weights {storage}" if storage is not None else "", ", comfy.ops" if ops is not None else "",
             load_device)
    if ops is None:
        return comfy.model_patcher.ModelPatcher(managed, load_device=load_device, offload_device=offload_device)
    # CoreModelPatcher is what core's own models get: the dynamic-VRAM patcher where the host enables it.
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(managed, load_device=load_device, offload_device=offload_device)
    _add_on_load(patcher, _loose_weights_to_device)
    return patcher


def load_dit_patcher(ckpt_name: str, dtype_choice: str, attention: str, weight_dtype: str = "default"):
    import comfy.model_management as mm

    from ..jodi_core.loading import load_jodi

    vocabulary.check_choice("attention", attention, vocabulary.ATTENTION_CHOICES)
    path = resolve_dit_path(ckpt_name)

    def auto_dtype(device):  # fp16 only when asked for: Sana-style DiTs were trained in bf16 and overflow in fp16
        return mm.unet_dtype(device, supported_dtypes=[torch.bfloat16, torch.float32])

    return load_patcher(functools.partial(load_jodi, attention_backend=attention), path, dtype_choice,
                        (mm.get_torch_device(), mm.unet_offload_device()), auto_dtype, "Jodi", weight_dtype)


def load_vae_patcher(vae_name: str, dtype_choice: str, attention: str = "auto"):
    import comfy.model_management as mm

    from ..jodi_core.loading import load_dcae

    vocabulary.check_choice("attention", attention, vocabulary.ATTENTION_CHOICES)
    path = resolve_vae_path(vae_name)

    def auto_dtype(device):
        return mm.vae_dtype(device, [torch.bfloat16])

    return load_patcher(functools.partial(load_dcae, attention_backend=attention), path, dtype_choice,
                        (mm.vae_device(), mm.vae_offload_device()), auto_dtype, "Jodi DC-AE")


def _add_on_load(patcher, callback) -> None:
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:
        return
    patcher.add_callback(CallbacksMP.ON_LOAD, callback)


def _loose_weights_to_device(patcher, device_to, lowvram_model_memory=0, force_patch_weights=False,
                             full_load=False) -> None:
    """After a partial load, the weights that comfy.ops cannot cast on use go to the load device whole.

    ComfyUI's (non-dynamic) partial load moves only leaf layers, and leaves on the offload device what fits no
    budget: parameters of modules with children (the DiT's scale_shift_table and domain_embedding), buffers and
    plain torch layers (norms). Core's models cast those on use; jodi_core reads them directly, so they are moved
    here (a few MB for the 1.6 B DiT). A full load moved everything already, and dynamic VRAM moves them itself."""
    if device_to is None or full_load or getattr(patcher, "is_dynamic", lambda: False)():
        return
    device_to = torch.device(device_to)

    def elsewhere(t: torch.Tensor) -> bool:  # a device without an index means the current one, as in torch
        return t.device.type != device_to.type or (device_to.index is not None and t.device.index != device_to.index)

    moved = 0
    for module in patcher.model.modules():
        castable = hasattr(module, "comfy_cast_weights")
        for name, param in list(module.named_parameters(recurse=False)):
            if not castable and elsewhere(param):
                module._parameters[name] = torch.nn.Parameter(param.to(device_to), requires_grad=False)
                moved += param.numel() * param.element_size()
        for name, buf in list(module.named_buffers(recurse=False)):
            if elsewhere(buf):
                module._buffers[name] = buf.to(device_to)
                moved += buf.numel() * buf.element_size()
    if moved:
        patcher.model.model_loaded_weight_memory += moved  # ComfyUI's count of what the load device holds
        log.debug("Jodi: %.1f MB of weights that are not cast on use moved to %s", moved / 2**20, device_to)


def uses_host_ops(patcher) -> bool:
    return bool(getattr(patcher.model, "host_ops", False))


def load_models(patchers, memory_required: int = 0) -> None:
    """Load the patchers' models onto their device with room for ``memory_required`` bytes of activations.

    Models built from comfy.ops load as core's do: whole when they fit, else partially, the rest of their weights
    cast on use. A model of plain torch layers (a loader without the ``operations`` hook) is loaded whole
    (force_full_load): a partial load would leave some of its weights on the CPU and fail mid-run. Running out of
    memory becomes an error that says what to do."""
    import comfy.model_management as mm

    patchers = list(patchers)
    whole = not all(uses_host_ops(p) for p in patchers)
    try:
        mm.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=whole)
    except mm.OOM_EXCEPTION as e:
        names = ", ".join(type(unwrap(p)).__name__ for p in patchers)
        raise RuntimeError(f"Not enough GPU memory to load {names} ({e}). Choose fp8 weights (weight_dtype) or a "
                           f"smaller dtype (bf16 or fp16) in the loader, a smaller batch or size, or start ComfyUI "
                           f"with --lowvram or --cpu.") from e


def load_for_run(model_patcher, vae_patcher, memory_required: int = 0) -> None:
    """Both Jodi models at once (runs that alternate between them, such as Annotate Folder)."""
    load_models([p for p in (model_patcher, vae_patcher) if p is not None], memory_required)


def device_need(needs: dict, *patchers) -> int:
    """The largest estimated need on the patchers' load devices: the room ComfyUI is asked to free for the run."""
    devices = {torch.device(p.load_device) for p in patchers}
    return max([int(n) for d, n in needs.items() if torch.device(d) in devices], default=0)


def merge_needs(*needs: dict) -> dict:
    """Per device, the largest of several phases' needs (the phases run one after the other)."""
    merged: dict = {}
    for need in needs:
        for device, n in need.items():
            device = torch.device(device)
            merged[device] = max(merged.get(device, 0), int(n))
    return merged


def free_memory(device) -> Optional[int]:
    """Bytes free on ``device`` as ComfyUI reports them (available RAM, or VRAM including torch's cache), capped for
    RAM by a container's limit, which psutil (ComfyUI's source) does not see; None where unknown."""
    import comfy.model_management as mm

    from ..jodi_core import memory

    device = torch.device(device)
    own = memory.available_memory(device)
    get_free = getattr(mm, "get_free_memory", None)
    if get_free is None:
        return own
    free = int(get_free(device))
    return min(free, own) if device.type == "cpu" and own is not None else free


def fits(needs: dict) -> bool:
    """Whether every device's need (CPU and CUDA) is at most what is free there."""
    for device, need in needs.items():
        device = torch.device(device)
        if device.type in ("cpu", "cuda"):
            free = free_memory(device)
            if free is not None and need > free:
                return False
    return True


def check_memory(needs: dict, what: str, host_only: bool = False) -> None:
    """Refuse a run whose estimated peak (JodiPipeline.memory_needs) exceeds what is free (:func:`free_memory`),
    with a clear error instead of an OOM kill. ``host_only``: check the RAM alone (GPU memory is only known once the
    models are loaded)."""
    from ..jodi_core import memory

    # Other backends (DirectML reports a fixed 1 GB) would be refused at random: CPU and CUDA only.
    kinds = ("cpu",) if host_only else ("cpu", "cuda")
    memory.check_fits({d: n for d, n in needs.items() if torch.device(d).type in kinds}, what, free_memory)


def check_patcher(value, what: str, expected: str):
    if value is None or not hasattr(value, "model") or not hasattr(value, "load_device"):
        raise TypeError(f"{what} must come from {expected}, got {type(value).__name__}.")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Progress, previews, interrupt
# ---------------------------------------------------------------------------------------------------------------------


def previews_enabled() -> bool:
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return False
    return args.preview_method != LatentPreviewMethod.NoPreviews


def preview_size() -> int:
    try:
        from comfy.cli_args import args

        return int(args.preview_size)
    except (ImportError, AttributeError):
        return 512


def to_pil(image_bchw: torch.Tensor):
    """First image of a (B, 3, H, W) [0, 1] batch as a PIL image."""
    from PIL import Image

    arr = (image_bchw[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


class Progress:
    """``progress(done, total)``: ComfyUI's progress bar, made on the first report (when the total is known).
    ``interruptible``: each report first raises ComfyUI's interrupt if the user cancelled, which stops a jodi_core
    loop that reports through a callback."""

    def __init__(self, interruptible: bool = True):
        self.interruptible = interruptible
        self.bar = None
        self.total = 0

    def __call__(self, done: int, total: int, preview=None) -> None:
        if self.interruptible:
            interrupt_check()
        if self.bar is None:
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(total)
        self.total = total
        self.bar.update_absolute(min(done, total), total, preview)

    def finish(self) -> None:
        """A full bar, for runs that may end before their step budget (answers that stop early)."""
        if self.bar is not None:
            self.bar.update_absolute(self.total, self.total)


class StepReporter:
    """The sampler callback: interrupt check, progress bar, and (if ComfyUI previews are on) a decoded preview of one
    generated domain, throttled so previews cost little next to the DiT steps."""

    def __init__(self, total: int, pipe, roles_row: torch.Tensor, min_interval_s: float = 1.0):
        self.progress = Progress(interruptible=False)  # checked before the preview instead
        self.pipe = pipe
        self.total = total
        self.min_interval_s = min_interval_s
        self.last_preview = 0.0
        self.preview_domain: Optional[int] = None
        if previews_enabled():
            generated = [i for i in range(len(DOMAIN_NAMES)) if int(roles_row[i]) == 0]
            self.preview_domain = generated[0] if generated else None  # the image when it is generated

    def __call__(self, step: int, x0: torch.Tensor, x_t: torch.Tensor, total: int) -> None:
        interrupt_check()
        preview = None
        now = time.monotonic()
        last = step + 1 >= total
        if self.preview_domain is not None and (last or now - self.last_preview >= self.min_interval_s):
            preview = self._preview(x0)
            self.last_preview = time.monotonic()
        self.progress(step + 1, total, preview)

    def _preview(self, x0: torch.Tensor):
        try:
            with torch.no_grad():
                images, _ = self.pipe.decode_latents(
                    x0[:1].float(), torch.zeros(1, len(DOMAIN_NAMES), dtype=torch.long),
                    x0.shape[-2] * self.pipe.compression, x0.shape[-1] * self.pipe.compression,
                    domains=[self.preview_domain],
                )
            image = next(iter(images.values()))
            return ("JPEG", to_pil(image), preview_size())
        except Exception as e:  # a preview must never break sampling
            log.warning("Jodi: preview failed (%s); previews are off for this run.", e)
            self.preview_domain = None
            return None


def interrupt_check() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def intermediate_device() -> torch.device:
    import comfy.model_management as mm

    return mm.intermediate_device()
