"""The jobs run on top of the library, each behind a ``python -m jodi_core`` command: ``train`` (a package: train a
DC-AE, then a Jodi DiT with the paper's role sampling), ``annotate`` (label a folder of images into a Joint-1.6M
layout dataset, also under torchrun or Ray), ``demo`` (the embedded demo model and its three-job grid) and
``metrics`` (depth, normal, segmentation and edge quality measures for judging outputs). Submodules are imported on
use, so importing this package costs nothing.
"""
