"""Jodi Annotate Folder: label a folder of images into a Joint-1.6M layout dataset (glue over
jodi_core.jobs.annotate)."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.v0_0_2 import io

from ..jodi_core.captioning import CAPTION_STYLES, DEFAULT_MAX_TOKENS, DEFAULT_STYLE
from ..jodi_core.jobs.annotate import ROOTS_ENV, extra_roots, resolve_inside
from ..jodi_core.domains import LABEL_NAMES, get_domain, perception_roles
from . import common, vocabulary
from .janus import MAX_NEW_TOKENS, JanusModelType

MAX_STEPS = 1000
MAX_BATCH = 64


ROOTS_HINT = (
    f"To allow other folders (a data disk), set {ROOTS_ENV} in the environment of the ComfyUI server to a list of "
    f"absolute folders separated by '{os.pathsep}'."
)


def _folder(path: str, what: str, base_getter: str) -> Path:
    """The folder, resolved (symlinks followed), which must lie inside ComfyUI's input (or output) directory or a
    folder of ``JODI_ANNOTATE_ROOTS``: a shared workflow is untrusted input, so no other folder of the server is
    read or written. A relative path is taken inside the ComfyUI directory."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be a folder path, got {path!r}.")
    import folder_paths

    base = Path(getattr(folder_paths, base_getter)())
    p = base / os.path.expanduser(path.strip())  # an absolute path replaces the base
    return resolve_inside(p, [base, *extra_roots()], what, hint=ROOTS_HINT)


def parse_domains(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names or [n.lower() for n in names] == ["all"]:
        return list(LABEL_NAMES)
    return [get_domain(n).name for n in names]  # a clear ValueError for unknown names


class JodiAnnotateFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiAnnotateFolder",
            display_name="Jodi Annotate Folder",
            category="Jodi/dataset",
            description=(
                "Labels every image in a folder (jpg, png, webp, recursively) with Jodi perception and writes a "
                "dataset in the Joint-1.6M layout: image/, annotation_<domain>/ and metadata.jsonl, ready for "
                "training. Unreadable images are listed in errors.jsonl. Interrupting keeps what is done; running "
                "again resumes and skips finished images. With a Janus model connected, every image is captioned "
                "too. The folders must lie inside ComfyUI's input and output "
                f"directories (or a folder listed in {ROOTS_ENV} on the server)."
            ),
            inputs=[
                common.JodiModel.Input("model", tooltip="Jodi model from Load Jodi Model."),
                common.JodiVAE.Input("vae", tooltip="DC-AE from Load Jodi DC-AE."),
                io.String.Input("input_folder", default="jodi_images",
                                tooltip="Folder of images inside ComfyUI's input directory (a relative path is "
                                        "taken there). Files that are symlinks out of it are skipped. "
                                        + ROOTS_HINT),
                io.String.Input("output_folder", default="jodi_dataset",
                                tooltip="Dataset folder to write inside ComfyUI's output directory (a relative path "
                                        "is taken there). An existing one is resumed. " + ROOTS_HINT),
                io.String.Input("domains", default="all",
                                tooltip=f"Comma-separated labels to produce, or 'all' ({', '.join(LABEL_NAMES)})."),
                io.Int.Input("steps", default=20, min=1, max=MAX_STEPS, tooltip="Sampling steps per image."),
                io.Int.Input("batch_size", default=4, min=1, max=MAX_BATCH,
                             tooltip="Images per batch (images are batched by aspect bucket)."),
                io.Int.Input("seed", default=0, min=0, max=2**62,
                             tooltip="Mixed into each image's seed, which is derived from its path."),
                JanusModelType.Input(
                    "caption_model", optional=True,
                    tooltip="Optional Janus model from Janus Loader: every image is also captioned, and its record "
                            "gets \"caption\": {\"<model folder name>\": \"<text>\"} (captions of other models "
                            "are kept). Images that have a caption of this model are not captioned again."),
                io.Combo.Input("caption_style", options=list(CAPTION_STYLES), default=DEFAULT_STYLE, optional=True,
                               tooltip="Janus Caption's presets. brief: one sentence. detailed: a long description. "
                                       "for a Jodi prompt: one paragraph for a text-to-image prompt."),
                io.Int.Input("caption_max_tokens", default=DEFAULT_MAX_TOKENS, min=1, max=MAX_NEW_TOKENS,
                             optional=True,
                             tooltip="Upper limit on a caption's length in tokens (a token is about 3/4 of a word)."),
            ],
            outputs=[io.String.Output(display_name="summary",
                                      tooltip="Done, skipped and failed counts and the output folder.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # the folders change outside the graph: run every time (finished images are skipped)

    @classmethod
    def validate_inputs(cls, caption_style=None, caption_max_tokens=None):
        return vocabulary.validation([
            lambda: caption_style is None or vocabulary.check_choice("caption_style", caption_style, CAPTION_STYLES),
            lambda: caption_max_tokens is None or vocabulary.check_number(
                "caption_max_tokens", caption_max_tokens, 1, MAX_NEW_TOKENS, integer=True),
        ])

    @classmethod
    def execute(cls, model, vae, input_folder, output_folder, domains="all", steps=20, batch_size=4,
                seed=0, caption_model=None, caption_style=DEFAULT_STYLE,
                caption_max_tokens=DEFAULT_MAX_TOKENS) -> io.NodeOutput:
        from ..jodi_core.jobs.annotate import AnnotateConfig, annotate
        from ..jodi_core.pipeline import JodiPipeline

        common.check_patcher(model, "model", "Load Jodi Model")
        common.check_patcher(vae, "vae", "Load Jodi DC-AE")
        janus = None
        if caption_model is not None:
            from ..jodi_core.janus import JanusModel

            common.check_patcher(caption_model, "caption_model", "Janus Loader")
            janus = common.unwrap(caption_model)
            if not isinstance(janus, JanusModel):
                raise TypeError(f"caption_model must come from Janus Loader, got a {type(janus).__name__}.")
            vocabulary.check_choice("caption_style", caption_style, CAPTION_STYLES)
            caption_max_tokens = vocabulary.check_number("caption_max_tokens", caption_max_tokens, 1,
                                                         MAX_NEW_TOKENS, integer=True)
        src = _folder(input_folder, "input_folder", "get_input_directory")
        if not src.is_dir():
            raise FileNotFoundError(f"input_folder {src} is not a folder.")
        out = _folder(output_folder, "output_folder", "get_output_directory")
        cfg = AnnotateConfig(
            input=str(src), output=str(out), domains=parse_domains(domains),
            steps=vocabulary.check_number("steps", steps, 1, MAX_STEPS, integer=True),
            batch_size=vocabulary.check_number("batch_size", batch_size, 1, MAX_BATCH, integer=True),
            seed=vocabulary.check_number("seed", seed, 0, 2**62, integer=True), progress=False,
        )
        if janus is not None:
            cfg.caption_name = janus.folder_name or "Janus"
            cfg.caption_style, cfg.caption_max_tokens = caption_style, caption_max_tokens
        pipe = JodiPipeline(common.unwrap(model), common.unwrap(vae))
        size = pipe.base_size  # the resolution annotate buckets to
        need = pipe.working_memory(cfg.batch_size, perception_roles(cfg.domains), size, size, use_cfg=False)
        placement = None
        if janus is None:
            common.load_for_run(model, vae, need)
        else:  # captions and maps take turns at asking for their models
            placement = _ComfyPlacement(model, vae, need, caption_model, cfg)

        def should_stop() -> bool:
            common.interrupt_check()  # raises ComfyUI's interrupt; finished images stay recorded
            return False

        summary = annotate(cfg, models=(common.unwrap(model), common.unwrap(vae)), janus=janus, placement=placement,
                           should_stop=should_stop, on_progress=common.Progress(interruptible=False))
        return io.NodeOutput(f"{summary} -> {out}")


class _ComfyPlacement:
    """The caption and map phases ask ComfyUI's model management for their models: it keeps both loaded when they
    fit and offloads the idle one when they do not (as between any two nodes)."""

    def __init__(self, model, vae, maps_need: int, janus_patcher, cfg):
        self.model, self.vae, self.maps_need = model, vae, maps_need
        self.janus_patcher, self.cfg = janus_patcher, cfg

    def captions(self) -> None:
        from ..jodi_core.captioning import CAPTION_PRESETS
        from .janus import _ready

        question = CAPTION_PRESETS[self.cfg.caption_style][0]
        _ready(self.janus_patcher, lambda m: m.kv_cache_bytes(
            1, m.prompt_length(question, 1) + self.cfg.caption_max_tokens))

    def maps(self) -> None:
        common.load_for_run(self.model, self.vae, self.maps_need)


NODES = [JodiAnnotateFolder]
