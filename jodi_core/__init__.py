"""jodi_core: a pure-PyTorch implementation of Jodi (arXiv 2505.19084) and Janus.

This package never imports ComfyUI; the ComfyUI nodes in ``nodes/`` are thin wrappers around it.
Imports here stay light (no model construction, no Triton, no CUDA) so that importing the pack is cheap.

Where things are: ``dit/`` the Jodi diffusion transformer (model, layers, linear attention, checkpoint keys);
``dcae/`` the DC-AE autoencoder (model, checkpoint keys); ``janus/`` Janus-Pro (its LLaMA language model, SigLIP
encoder, VQ image decoder, generation); ``kernels/`` the optional Triton kernels; ``data/`` training data; ``jobs/``
what runs on top: ``train/``, ``annotate``, ``demo``, ``metrics``. The shared pieces sit at the top: ``pipeline``
(one Jodi run, roles and conditions in, maps out), ``sampling`` (the sampler loops), ``domains`` (the 8 domains, their
roles and post-processing), ``imaging``, ``text`` (the caption pipeline), ``checkpoint`` (reading files), ``loading``
(files to models), ``atomic`` (atomic writes), ``gemma`` (Gemma file conversion), ``memory`` (will a run fit).
The ComfyUI node definitions are in ``nodes/`` beside this package.
"""

from .domains import DOMAINS, DOMAIN_NAMES, NUM_DOMAINS, Role

__version__ = "0.1.0"

__all__ = ["DOMAINS", "DOMAIN_NAMES", "NUM_DOMAINS", "Role", "__version__"]
