"""Janus / Janus-Pro nodes: loader, captioning, visual question answering and text-to-image.

The model runs on jodi_core.janus (plain PyTorch, no ``janus`` package, no remote code). A model is a folder under
models/Janus-Pro (or a folder extra_model_paths.yaml adds under the name ``Janus-Pro``) holding the checkpoint as
published: weights (pytorch_model.bin or model.safetensors, maybe sharded), config.json, tokenizer.json and
preprocessor_config.json. The loader wraps it in a ComfyUI ModelPatcher, so it moves to the GPU when a node uses it,
is offloaded when ComfyUI needs the room and is dropped by 'Free model and node cache'.
"""

from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.v0_0_2 import io

from ..jodi_core.captioning import CAPTION_PRESETS, one_line as _one_line
from . import common, layouts, vocabulary
from .loaders import weight_dtype_input

JanusModelType = io.Custom("JANUS_MODEL")

JANUS_FOLDER = "Janus-Pro"  # registered by the pack's __init__ (models/Janus-Pro plus extra_model_paths.yaml)
_MODEL_MARKERS = ("config.json", "tokenizer.json")  # what makes a folder a model folder
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json")  # a change to one of these reloads the model

MAX_NEW_TOKENS = 4096
MAX_PARALLEL = 16  # the reference's parallel_size
MAX_CFG = 50.0

_DTYPE_TIP = (
    "Weight and compute precision. auto: bf16 where the GPU supports it (Janus was trained in bf16), fp16 on older "
    "GPUs, fp32 on the CPU (--cpu). fp32 on a GPU needs 4 bytes per weight (about 8 GB for Janus-Pro-1B)."
)
_MODEL_TIP = "A Janus / Janus-Pro model from Janus Loader."


# ---------------------------------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------------------------------


def janus_roots() -> list[Path]:
    """The folders Janus models are listed from, in lookup order."""
    return common.folder_roots(JANUS_FOLDER)


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_file() for m in _MODEL_MARKERS)


def janus_choices() -> list[str]:
    """Model folders under the Janus roots, as relative names: ``Janus-Pro-1B`` or one level deeper
    (``deepseek-ai/Janus-Pro-7B``, as a hub download tool may lay them out)."""
    names: list[str] = []
    for root in janus_roots():
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if _is_model_folder(child):
                candidates = [child.name]
            elif child.is_dir():
                candidates = [f"{child.name}/{g.name}" for g in sorted(child.iterdir()) if _is_model_folder(g)]
            else:
                candidates = []
            names += [c for c in candidates if c not in names]
    return sorted(names)


def resolve_janus_path(name: str) -> Path:
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise ValueError(f"model_name must be a folder name from the list, got {name!r}.")
    for root in janus_roots():
        path = root / name
        if _is_model_folder(path):
            return path
    roots = ", ".join(str(r) for r in janus_roots()) or "models/Janus-Pro"
    raise FileNotFoundError(
        f"Janus model folder {name!r} was not found in {roots}. Put the whole model folder there (e.g. "
        "deepseek-ai/Janus-Pro-1B as models/Janus-Pro/Janus-Pro-1B with its weights, config.json and tokenizer.json) "
        "and refresh."
    )


def _auto_dtype(load_device) -> torch.dtype:
    """bf16 (Janus's training precision) where ComfyUI would use it; fp16 on GPUs without bf16, where fp32 would
    not fit a 7B model; fp32 on the CPU. ComfyUI's --force-fp32/--force-fp16 flags act through its checks."""
    import comfy.model_management as mm

    if load_device.type == "cpu":
        return torch.float32
    for dtype, check in ((torch.bfloat16, "should_use_bf16"), (torch.float16, "should_use_fp16")):
        should = getattr(mm, check, None)
        if should is not None and should(load_device):
            return dtype
    return torch.float32


def load_janus_patcher(model_name: str, dtype_choice: str, weight_dtype: str = "default"):
    import comfy.model_management as mm

    from ..jodi_core.janus import load_janus

    path = resolve_janus_path(model_name)
    return common.load_patcher(load_janus, path, dtype_choice, (mm.get_torch_device(), mm.unet_offload_device()),
                               _auto_dtype, "Janus", weight_dtype)


def _ready(model_patcher, working_memory=None):
    """The JanusModel behind a patcher, loaded on the patcher's device with room for ``working_memory(model)`` bytes
    of activations and KV cache, and for the cast copy of its largest fp8 weight (the 7B's text head: 0.8 GiB)."""
    from ..jodi_core.janus import JanusModel
    from ..jodi_core.ops import cast_workspace_bytes

    common.check_patcher(model_patcher, "model", "Janus Loader")
    model = common.unwrap(model_patcher)
    if not isinstance(model, JanusModel):
        raise TypeError(f"model must come from Janus Loader, got a {type(model).__name__}.")
    need = (int(working_memory(model)) if working_memory is not None else 0) + cast_workspace_bytes(model)
    common.load_models([model_patcher], need)
    # A CUDA graph replays the copies it captured; weights cast on use from the offload device are new tensors each
    # step, so decode eagerly unless every weight is resident.
    held_apart = bool(getattr(model_patcher.model, "model_lowvram", False)) or bool(
        getattr(model_patcher, "is_dynamic", lambda: False)())
    model.decode_mode = "eager" if held_apart else "auto"
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Input checks (the server does not check V3 combos; validate_inputs turns off its range checks for named inputs)
# ---------------------------------------------------------------------------------------------------------------------


def _check_sampling(max_new_tokens, temperature, top_p, repetition_penalty, seed) -> None:
    vocabulary.check_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True)
    vocabulary.check_number("temperature", temperature, 0.0, 2.0)
    vocabulary.check_number("top_p", top_p, 0.01, 1.0)
    vocabulary.check_number("repetition_penalty", repetition_penalty, 1.0, 2.0)
    vocabulary.check_number("seed", seed, 0, vocabulary.MAX_SEED, integer=True)


def _image_rows(image, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, 3) -> (B, 3, H, W) in [0, 1] on the CPU (the processor resizes on the CPU)."""
    return layouts.image_to_bchw(image, what).cpu()


def _understand(model_patcher, images, questions, *, max_new_tokens: int, **sampling) -> list[str]:
    """One answer per row: ``images`` is a list with one entry per row (None, (3, H, W) or (N, 3, H, W))."""
    from ..jodi_core.janus import janus_understand_in_chunks, understanding_cache_bytes

    common.interrupt_check()
    model = _ready(model_patcher, lambda m: understanding_cache_bytes(m, images, questions, max_new_tokens))
    progress = common.Progress()
    answers = janus_understand_in_chunks(model, images, questions, max_new_tokens=max_new_tokens, callback=progress,
                                         **sampling)
    progress.finish()
    return [a.strip() for a in answers]


# ---------------------------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------------------------


class JanusLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = janus_choices()
        return io.Schema(
            node_id="JanusLoader",
            display_name="Janus Loader",
            category="Janus/loaders",
            description=(
                "Loads a Janus or Janus-Pro model (deepseek-ai Janus-1.3B, Janus-Pro-1B, Janus-Pro-7B, original or "
                "transformers-converted) from a folder in models/Janus-Pro. Runs in plain PyTorch on any device "
                "ComfyUI uses, CPU included; ComfyUI moves it to the GPU when used and offloads or unloads it like "
                "its own models."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name", options=choices, default=choices[0] if choices else None,
                    tooltip="Model folder in models/Janus-Pro (or an extra_model_paths.yaml 'Janus-Pro' folder) with "
                            "the checkpoint's weights, config.json, tokenizer.json and preprocessor_config.json, "
                            "e.g. Janus-Pro-1B downloaded from deepseek-ai/Janus-Pro-1B."),
                io.Combo.Input("dtype", options=list(vocabulary.DTYPE_CHOICES), default="auto", tooltip=_DTYPE_TIP),
                weight_dtype_input(),
            ],
            outputs=[JanusModelType.Output(
                display_name="janus_model",
                tooltip="The Janus model (understanding and image generation), managed by ComfyUI.")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None, dtype=None, weight_dtype=None):
        def check_model():
            if model_name is None:
                return
            choices = janus_choices()
            if not choices:
                roots = ", ".join(str(r) for r in janus_roots()) or "models/Janus-Pro"
                raise ValueError(f"No Janus model folder found in {roots}: put e.g. Janus-Pro-1B there (the whole "
                                 "folder with weights, config.json and tokenizer.json) and refresh.")
            vocabulary.check_choice("model_name", model_name, choices)

        return vocabulary.validation([
            check_model,
            lambda: dtype is None or vocabulary.check_choice("dtype", dtype, vocabulary.DTYPE_CHOICES),
            lambda: weight_dtype is None or vocabulary.check_choice("weight_dtype", weight_dtype,
                                                                    vocabulary.WEIGHT_DTYPE_CHOICES),
        ])

    @classmethod
    def fingerprint_inputs(cls, model_name, dtype="auto", weight_dtype="default"):
        return (common.file_fingerprint(resolve_janus_path, model_name, _MODEL_FILE_SUFFIXES), dtype, weight_dtype)

    @classmethod
    def execute(cls, model_name, dtype="auto", weight_dtype="default") -> io.NodeOutput:
        vocabulary.check_choice("dtype", dtype, vocabulary.DTYPE_CHOICES)
        return io.NodeOutput(load_janus_patcher(model_name, dtype, weight_dtype))


class JanusCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JanusCaption",
            display_name="Janus Caption",
            category="Janus/understanding",
            description=(
                "Captions every image of a batch with Janus (greedy decoding, so the same image gives the same "
                "caption). The output is a list with one caption per image; 'for a Jodi prompt' gives a one-"
                "paragraph description to connect to Jodi Text Encode's text."
            ),
            inputs=[
                JanusModelType.Input("model", tooltip=_MODEL_TIP),
                io.Image.Input("image", tooltip="Image or batch of images; each gets its own caption."),
                io.Combo.Input(
                    "detail", options=list(CAPTION_PRESETS), default="for a Jodi prompt",
                    tooltip="brief: one sentence. detailed: a long description. for a Jodi prompt: one paragraph "
                            "(subjects, setting, light, colours, style) folded into one line, for a text-to-image "
                            "model."),
                io.Int.Input("max_new_tokens", default=256, min=1, max=MAX_NEW_TOKENS,
                             tooltip="Upper limit on the caption length in tokens (a token is about 3/4 of a word)."),
            ],
            outputs=[io.String.Output(display_name="caption", is_output_list=True,
                                      tooltip="One caption per image (a list: the nodes after it run once per "
                                              "caption).")],
        )

    @classmethod
    def validate_inputs(cls, detail=None, max_new_tokens=None):
        return vocabulary.validation([
            lambda: detail is None or vocabulary.check_choice("detail", detail, tuple(CAPTION_PRESETS)),
            lambda: max_new_tokens is None or vocabulary.check_number("max_new_tokens", max_new_tokens, 1,
                                                                      MAX_NEW_TOKENS, integer=True),
        ])

    @classmethod
    def execute(cls, model, image, detail="for a Jodi prompt", max_new_tokens=256) -> io.NodeOutput:
        vocabulary.check_choice("detail", detail, tuple(CAPTION_PRESETS))
        max_new_tokens = vocabulary.check_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True)
        question, one_line = CAPTION_PRESETS[detail]
        rows = _image_rows(image)
        captions = _understand(model, list(rows), [question] * rows.shape[0], max_new_tokens=max_new_tokens,
                               do_sample=False)
        if one_line:
            captions = [_one_line(c) for c in captions]
        return io.NodeOutput(captions, ui={"text": captions})


class JanusAsk(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JanusAsk",
            display_name="Janus Ask",
            category="Janus/understanding",
            description=(
                "Asks Janus a question about an image (visual question answering, OCR, descriptions), or a plain "
                "text question when no image is connected. One answer per image of the batch, or one answer about "
                "all of them together."
            ),
            inputs=[
                JanusModelType.Input("model", tooltip=_MODEL_TIP),
                io.String.Input("question", multiline=True, default="What is in this image?",
                                tooltip="The question or instruction, in plain language."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional image or batch. Unconnected: a text-only question."),
                io.Boolean.Input("images_together", default=False,
                                 tooltip="Off: one answer per image. On: one answer, with all images of the batch "
                                         "shown to Janus in order (to compare them)."),
                io.Boolean.Input("do_sample", default=False,
                                 tooltip="Off: greedy decoding (deterministic; the reference's setting). On: sample "
                                         "with temperature and top_p."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=2.0, step=0.05, round=0.01,
                               tooltip="Sampling temperature (with do_sample). Lower is more focused; 0 is greedy."),
                io.Float.Input("top_p", default=0.95, min=0.01, max=1.0, step=0.01, round=0.01,
                               tooltip="Nucleus sampling (with do_sample): keep the most likely tokens up to this "
                                       "total probability."),
                io.Int.Input("max_new_tokens", default=512, min=1, max=MAX_NEW_TOKENS,
                             tooltip="Upper limit on the answer length in tokens (the reference uses 512)."),
                io.Float.Input("repetition_penalty", default=1.0, min=1.0, max=2.0, step=0.05, round=0.01,
                               tooltip="Above 1 discourages repeating tokens already in the answer (1 = off)."),
                io.Int.Input("seed", default=0, min=0, max=vocabulary.MAX_SEED, control_after_generate=True,
                             tooltip="Random seed for sampling (no effect with do_sample off)."),
            ],
            outputs=[io.String.Output(display_name="answer", is_output_list=True,
                                      tooltip="The answers: one per image, or a single one (images_together or no "
                                              "image).")],
        )

    @classmethod
    def validate_inputs(cls, temperature=None, top_p=None, max_new_tokens=None, repetition_penalty=None, seed=None):
        values = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      repetition_penalty=repetition_penalty, seed=seed)
        ranges = dict(max_new_tokens=(1, MAX_NEW_TOKENS, True), temperature=(0.0, 2.0, False),
                      top_p=(0.01, 1.0, False), repetition_penalty=(1.0, 2.0, False),
                      seed=(0, vocabulary.MAX_SEED, True))
        return vocabulary.validation([
            (lambda n=n, v=v: v is None or vocabulary.check_number(n, v, *ranges[n][:2], integer=ranges[n][2]))
            for n, v in values.items()
        ])

    @classmethod
    def execute(cls, model, question, image=None, images_together=False, do_sample=False, temperature=1.0,
                top_p=0.95, max_new_tokens=512, repetition_penalty=1.0, seed=0) -> io.NodeOutput:
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}.")
        if not question.strip():
            raise ValueError("Janus Ask: the question is empty.")
        _check_sampling(max_new_tokens, temperature, top_p, repetition_penalty, seed)
        if image is None:
            images = [None]
        else:
            rows = _image_rows(image)
            images = [rows] if images_together else list(rows)  # (N, 3, H, W) = N images in one question
        answers = _understand(
            model, images, [question] * len(images), max_new_tokens=int(max_new_tokens),
            do_sample=bool(do_sample) and temperature > 0, temperature=float(temperature), top_p=float(top_p),
            repetition_penalty=float(repetition_penalty), seed=int(seed),
        )
        return io.NodeOutput(answers, ui={"text": answers})


class JanusGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JanusGenerate",
            display_name="Janus Generate",
            category="Janus/generation",
            description=(
                "Text-to-image with Janus: the model writes the image as 576 VQ tokens (with classifier-free "
                "guidance), decoded to a 384x384 image for the released models. The progress bar counts image "
                "tokens; Cancel stops between tokens."
            ),
            inputs=[
                JanusModelType.Input("model", tooltip=_MODEL_TIP),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to draw, in plain language (no weight syntax)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=MAX_CFG, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance weight (the reference uses 5). 1 = no guidance; "
                                       "higher follows the prompt more closely."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=2.0, step=0.05, round=0.01,
                               tooltip="Sampling temperature of the image tokens (reference 1). 0 = greedy: "
                                       "deterministic but usually flat images."),
                io.Int.Input("seed", default=0, min=0, max=vocabulary.MAX_SEED, control_after_generate=True,
                             tooltip="Random seed: the same seed, prompt and settings give the same images on the "
                                     "same device."),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_PARALLEL,
                             tooltip="Images generated together (the reference's parallel_size)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The generated images (B, 384, 384, 3).")],
        )

    @classmethod
    def validate_inputs(cls, prompt=None, cfg=None, temperature=None, seed=None, batch_size=None):
        return vocabulary.validation([
            lambda: prompt is None or _check_prompt(prompt),
            lambda: cfg is None or vocabulary.check_number("cfg", cfg, 0.0, MAX_CFG),
            lambda: temperature is None or vocabulary.check_number("temperature", temperature, 0.0, 2.0),
            lambda: seed is None or vocabulary.check_number("seed", seed, 0, vocabulary.MAX_SEED, integer=True),
            lambda: batch_size is None or vocabulary.check_number("batch_size", batch_size, 1, MAX_PARALLEL,
                                                                  integer=True),
        ])

    @classmethod
    def execute(cls, model, prompt, cfg=5.0, temperature=1.0, seed=0, batch_size=1) -> io.NodeOutput:
        from ..jodi_core.janus import janus_generate_codes

        _check_prompt(prompt)
        cfg = vocabulary.check_number("cfg", cfg, 0.0, MAX_CFG)
        temperature = vocabulary.check_number("temperature", temperature, 0.0, 2.0)
        seed = vocabulary.check_number("seed", seed, 0, vocabulary.MAX_SEED, integer=True)
        batch_size = vocabulary.check_number("batch_size", batch_size, 1, MAX_PARALLEL, integer=True)
        common.interrupt_check()
        # Conditional and unconditional rows: prompt plus the image tokens.
        janus = _ready(model, lambda m: m.kv_cache_bytes(
            2 * batch_size, len(m.processor.generation_ids(prompt)) + m.config.gen_image_tokens))
        codes = janus_generate_codes(janus, prompt, cfg_weight=cfg, temperature=temperature,
                                     parallel_size=batch_size, seed=seed, callback=common.Progress())
        common.interrupt_check()
        images = janus.decode_image_codes(codes)  # (B, 3, S, S) in [0, 1]
        return io.NodeOutput(layouts.bchw_to_image(images).to(common.intermediate_device()))


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError("Janus Generate needs a prompt: with an empty one the guided and unguided rows are the "
                         "same and the images are unconditioned.")


NODES = [JanusLoader, JanusCaption, JanusAsk, JanusGenerate]
