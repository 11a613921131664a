"""The DC-AE f32c32 autoencoder under Sana and Jodi: ``model`` holds :class:`~.model.DCAE` and its config (encode,
decode, tiling, the latent scale); ``keys`` the two state-dict key layouts in circulation (the original efficientvit
one and diffusers' ``AutoencoderDC``), the conversion between them, and the config read from keys, shapes and file
metadata. Submodules are imported on use, so importing this package costs nothing.
"""
