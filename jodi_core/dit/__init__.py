"""The Jodi DiT, the diffusion transformer that denoises the 8 domains jointly. ``model`` holds
:class:`~.model.JodiTransformer` and :class:`~.model.JodiConfig` (``prepare`` turns the roles into the run's context,
with the role mask that keeps ignored domains' tokens out of attention; ``forward_prepared`` is one step); ``layers``
its building blocks (role and timestep embeddings, adaLN modulation, linear self-attention, caption cross-attention,
GLUMBConv); ``attention`` ReLU linear attention and the one registry of its backends (``torch``, ``triton``), which
the DC-AE uses too; ``keys`` the checkpoint's key names and the config read from keys, shapes and file metadata.
Submodules are imported on use, so importing this package costs nothing.
"""
