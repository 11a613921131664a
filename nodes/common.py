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
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def get_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def unwrap(patcher) -> torch.nn.Module:
    """The jodi_core module behind a patcher from the Jodi loaders."""
    model = patcher.model
    return model.module if isinstance(model, ManagedModule) else model


def _pick_dtype(choice: str, auto_dtype: Callable[[], torch.dtype]) -> torch.dtype:
    dtype = vocabulary.torch_dtype(choice) or auto_dtype()
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        # fp8/fp64 flags of ComfyUI are for its own models; jodi_core computes in the weight dtype.
        log.warning("Jodi: dtype %s from ComfyUI's flags is not supported; using float32.", dtype)
        dtype = torch.float32
    return dtype


def load_patcher(load, path, dtype_choice: str, devices: tuple, auto_dtype: Callable, what: str):
    """A jodi_core module from ``load(path, dtype=, device=)``, on ``devices`` = (load device, offload device), in
    a ModelPatcher: ComfyUI moves it to the load device when a node uses it. ``auto_dtype(load_device)``: the dtype
    the 'auto' choice means for this model; ``what``: the model's name in the log."""
    import comfy.model_patcher

    load_device, offload_device = devices
    dtype = _pick_dtype(dtype_choice, lambda: auto_dtype(load_device))
    module = load(path, dtype=dtype, device=offload_device).eval()
    log.info("%s: loaded %s (%s) for %s", what, os.path.basename(path), dtype, load_device)
    return comfy.model_patcher.ModelPatcher(ManagedModule(module), load_device=load_device,
                                            offload_device=offload_device)


def load_dit_patcher(ckpt_name: str, dtype_choice: str, attention: str):
    import comfy.model_management as mm

    from ..jodi_core.loading import load_jodi

    vocabulary.check_choice("attention", attention, vocabulary.ATTENTION_CHOICES)
    path = resolve_dit_path(ckpt_name)

    def auto_dtype(device):  # fp16 only when asked for: Sana-style DiTs were trained in bf16 and overflow in fp16
        return mm.unet_dtype(device, supported_dtypes=[torch.bfloat16, torch.float32])

    return load_patcher(functools.partial(load_jodi, attention_backend=attention), path, dtype_choice,
                        (mm.get_torch_device(), mm.unet_offload_device()), auto_dtype, "Jodi")


def load_vae_patcher(vae_name: str, dtype_choice: str, attention: str = "auto"):
    import comfy.model_management as mm

    from ..jodi_core.loading import load_dcae

    vocabulary.check_choice("attention", attention, vocabulary.ATTENTION_CHOICES)
    path = resolve_vae_path(vae_name)

    def auto_dtype(device):
        return mm.vae_dtype(device, [torch.bfloat16])

    return load_patcher(functools.partial(load_dcae, attention_backend=attention), path, dtype_choice,
                        (mm.vae_device(), mm.vae_offload_device()), auto_dtype, "Jodi DC-AE")


def check_patcher(value, what: str, expected: str):
    if value is None or not hasattr(value, "model") or not hasattr(value, "load_device"):
        raise TypeError(f"{what} must come from {expected}, got {type(value).__name__}.")
    return value


def load_fully(patchers, memory_required: int = 0) -> None:
    """Load the patchers' models whole onto their device. Our modules are plain torch (no ComfyUI weight casting), so
    a partial ("lowvram") load would leave some weights on the CPU and fail mid-run; ask for a full load, and turn
    running out of memory into an error that says what to do."""
    import comfy.model_management as mm

    try:
        mm.load_models_gpu(list(patchers), memory_required=memory_required, force_full_load=True)
    except mm.OOM_EXCEPTION as e:
        names = ", ".join(type(unwrap(p)).__name__ for p in patchers)
        raise RuntimeError(f"Not enough GPU memory to load {names} whole ({e}). Choose a smaller dtype (bf16 or "
                           f"fp16) in the loader, a smaller batch or size, or start ComfyUI with --cpu.") from e


def load_for_run(model_patcher, vae_patcher, memory_required: int = 0) -> None:
    load_fully([p for p in (model_patcher, vae_patcher) if p is not None], memory_required)


def device_need(needs: dict, *patchers) -> int:
    """The largest estimated need on the patchers' load devices: the room ComfyUI is asked to free for the run."""
    devices = {torch.device(p.load_device) for p in patchers}
    return max([int(n) for d, n in needs.items() if torch.device(d) in devices], default=0)


def check_memory(needs: dict, what: str, host_only: bool = False) -> None:
    """Refuse a run whose estimated peak (JodiPipeline.memory_needs) exceeds what ComfyUI reports free
    (get_free_memory: available RAM, or VRAM including torch's cache), with a clear error instead of an OOM kill.
    ``host_only``: check the RAM alone (GPU memory is only known once the models are loaded)."""
    import comfy.model_management as mm

    from ..jodi_core import memory

    get_free = getattr(mm, "get_free_memory", None)

    def available(device: torch.device) -> Optional[int]:
        own = memory.available_memory(device)
        if get_free is None:
            return own
        free = int(get_free(device))
        # psutil (ComfyUI's source for RAM) does not see a container's memory limit; ours does.
        return min(free, own) if device.type == "cpu" and own is not None else free

    # Other backends (DirectML reports a fixed 1 GB) would be refused at random: CPU and CUDA only.
    kinds = ("cpu",) if host_only else ("cpu", "cuda")
    memory.check_fits({d: n for d, n in needs.items() if torch.device(d).type in kinds}, what, available)


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
