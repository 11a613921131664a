"""Captions with Janus: the caption presets (one place, shared by the Janus Caption node and the folder annotator) and
:class:`Captioner`, which captions one image at a time.

Decoding is the Janus Caption node's: greedy (so the same image gives the same caption), answers stripped, and
folded into one line for the styles that fold. Each image is captioned in its own call with a seed derived from its
key, so a caption never depends on which other images were in the batch, the batch size or the shard.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

__all__ = ["CAPTION_PRESETS", "CAPTION_STYLES", "DEFAULT_MAX_TOKENS", "DEFAULT_STYLE", "STYLE_ALIASES", "Captioner",
           "CaptionStopped", "caption_name", "caption_style", "check_janus_folder", "one_line"]

# Caption presets: (question, whether the answer is folded into one line). The "Jodi prompt" wording asks for what
# a text-to-image caption holds (subjects, setting, light, style) and nothing else, so it can go to Jodi Text Encode.
CAPTION_PRESETS: dict[str, tuple[str, bool]] = {
    "brief": ("Describe this image in one sentence.", True),
    "detailed": ("Describe this image in detail.", False),
    "for a Jodi prompt": (
        "Describe this image as a prompt for a text-to-image model, in one paragraph: the main subjects and their "
        "appearance, the setting, the lighting, the colours and the style. Reply with the description only.",
        True,
    ),
}
CAPTION_STYLES = tuple(CAPTION_PRESETS)
# Spellings without spaces, for command lines and config files.
STYLE_ALIASES = {"jodi-prompt": "for a Jodi prompt", "jodi_prompt": "for a Jodi prompt", "jodi": "for a Jodi prompt",
                 "for-a-jodi-prompt": "for a Jodi prompt"}
DEFAULT_STYLE = "detailed"
DEFAULT_MAX_TOKENS = 256
_JANUS_MARKERS = ("config.json", "tokenizer.json")  # what makes a folder a Janus model folder (as the node lists)


class CaptionStopped(Exception):
    """The caller's ``should_stop`` asked to stop while a caption was being written."""


def caption_style(name: str) -> str:
    """The preset name for ``name`` (a preset, or an alias such as ``jodi-prompt``; case is ignored)."""
    if isinstance(name, str):
        text = name.strip()
        for style in CAPTION_STYLES:
            if text.lower() == style.lower():
                return style
        if text.lower() in STYLE_ALIASES:
            return STYLE_ALIASES[text.lower()]
    choices = ", ".join([*CAPTION_STYLES, *STYLE_ALIASES])
    raise ValueError(f"caption style must be one of {choices}; got {name!r}.")


def one_line(text: str) -> str:
    """Whitespace runs folded to one space, surrounding quotes and spaces removed."""
    return re.sub(r"\s+", " ", text).strip().strip('"').strip()


def caption_name(folder: "str | Path") -> str:
    """The key a model folder's captions go under in a record: the folder's name (``Janus-Pro-1B``)."""
    import os

    return Path(os.path.abspath(os.path.expanduser(str(folder)))).name


def check_janus_folder(folder: "str | Path", what: str = "caption model") -> Path:
    """``folder`` resolved, or a clear error when it is not a Janus model folder (config.json and tokenizer.json,
    a Janus config). The weights themselves are checked when the model loads."""
    import json
    import os

    path = Path(os.path.realpath(os.path.expanduser(str(folder))))
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(folder)!r} does not exist; give a Janus / Janus-Pro model folder "
                                f"(e.g. Janus-Pro-1B with its weights, config.json and tokenizer.json).")
    if not path.is_dir():
        raise ValueError(f"{what} {str(folder)!r} is a file; give the Janus model folder that holds it "
                         f"({path.parent}).")
    missing = [m for m in _JANUS_MARKERS if not (path / m).is_file()]
    if missing:
        raise ValueError(f"{what} {str(folder)!r} is not a Janus model folder: it has no {' or '.join(missing)} "
                         f"(a Janus / Janus-Pro folder holds its weights, config.json and tokenizer.json).")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(folder)!r}: config.json is not a JSON object ({e}).") from None
    if model_type not in (None, "multi_modality", "janus"):
        raise ValueError(f"{what} {str(folder)!r} holds a {model_type!r} model, not Janus.")
    return path


class Captioner:
    """Captions images with a loaded Janus model (from ``jodi_core.janus.load_janus``).

    ``caption(image, key)``: ``image`` is a (3, H, W) float tensor in [0, 1]; ``key`` (the image's path in the
    dataset) seeds the call with ``image_seed(key, seed)``. The answer length is capped once to the room the model's
    context leaves after the prompt (with one warning), not per image.
    """

    def __init__(self, model, style: str = DEFAULT_STYLE, max_new_tokens: int = DEFAULT_MAX_TOKENS, *, seed: int = 0,
                 should_stop: Optional[Callable[[], bool]] = None):
        self.model = model
        self.style = caption_style(style)
        self.question, self.fold = CAPTION_PRESETS[self.style]
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self.should_stop = should_stop
        self._limit: Optional[int] = None

    def _length(self) -> int:
        if self._limit is None:
            room = self.model.answer_room([self.question], [1])
            if room < self.max_new_tokens:
                log.warning("Janus: max_new_tokens %d does not fit the model's context after the prompt; using %d.",
                            self.max_new_tokens, room)
            self._limit = min(self.max_new_tokens, room)
        return self._limit

    def caption(self, image: torch.Tensor, key: str) -> str:
        from .janus import JanusInterrupted, janus_understand
        from .jobs.annotate import image_seed

        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image))}.")
        try:
            answer = janus_understand(self.model, [image.float().cpu()], [self.question],
                                      max_new_tokens=self._length(), do_sample=False,
                                      seed=image_seed(key, self.seed), should_stop=self.should_stop)[0]
        except JanusInterrupted as e:
            raise CaptionStopped() from e
        answer = answer.strip()
        return one_line(answer) if self.fold else answer
