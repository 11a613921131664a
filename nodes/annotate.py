"""Jodi Annotate Folder: label a folder of images into a Joint-1.6M layout dataset (glue over
jodi_core.jobs.annotate)."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.v0_0_2 import io

from ..jodi_core.jobs.annotate import ROOTS_ENV, extra_roots, resolve_inside
from ..jodi_core.domains import LABEL_NAMES, get_domain, perception_roles
from . import common, vocabulary

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
                "again resumes and skips finished images. The folders must lie inside ComfyUI's input and output "
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
            ],
            outputs=[io.String.Output(display_name="summary",
                                      tooltip="Done, skipped and failed counts and the output folder.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # the folders change outside the graph: run every time (finished images are skipped)

    @classmethod
    def execute(cls, model, vae, input_folder, output_folder, domains="all", steps=20, batch_size=4,
                seed=0) -> io.NodeOutput:
        from ..jodi_core.jobs.annotate import AnnotateConfig, annotate
        from ..jodi_core.pipeline import JodiPipeline

        common.check_patcher(model, "model", "Load Jodi Model")
        common.check_patcher(vae, "vae", "Load Jodi DC-AE")
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
        pipe = JodiPipeline(common.unwrap(model), common.unwrap(vae))
        size = pipe.base_size  # the resolution annotate buckets to
        need = pipe.working_memory(cfg.batch_size, perception_roles(cfg.domains), size, size, use_cfg=False)
        common.load_for_run(model, vae, need)

        def should_stop() -> bool:
            common.interrupt_check()  # raises ComfyUI's interrupt; finished images stay recorded
            return False

        summary = annotate(cfg, models=(common.unwrap(model), common.unwrap(vae)), should_stop=should_stop,
                           on_progress=common.Progress(interruptible=False))
        return io.NodeOutput(f"{summary} -> {out}")


NODES = [JodiAnnotateFolder]
