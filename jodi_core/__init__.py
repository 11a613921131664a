"""jodi_core: a pure-PyTorch implementation of Jodi (arXiv 2505.19084) and Janus.

This package never imports ComfyUI; the ComfyUI nodes in ``nodes/`` are thin wrappers around it.
Imports here stay light (no model construction, no Triton, no CUDA) so that importing the pack is cheap.
"""

from .domains import DOMAINS, DOMAIN_NAMES, NUM_DOMAINS, Role

__version__ = "0.1.0"

__all__ = ["DOMAINS", "DOMAIN_NAMES", "NUM_DOMAINS", "Role", "__version__"]
