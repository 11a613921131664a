"""Single-token decode steps over the static KV cache, replayed from a CUDA graph when the model is on CUDA.

At batch 1 a decode step of the 1.3B model is a few hundred small kernels, so launch overhead dominates on a GPU;
capturing the step once per run and replaying it removes that overhead. The captured step has fixed shapes (it
attends over the whole cache with the unwritten tail masked) and takes its inputs from static buffers. Anything
that goes wrong while capturing logs one warning and falls back to eager steps.
"""

from __future__ import annotations

import logging

import torch

from .llama import LlamaModel, StaticKVCache

log = logging.getLogger(__name__)
_warned = False


class DecodeStepper:
    """``stepper(embeds (B, 1, D), positions (B, 1)) -> hidden (B, 1, D)``; advances ``cache.length`` by one.

    With a CUDA graph the returned tensor is a static buffer that the next call overwrites: use it before then.
    """

    def __init__(self, lm: LlamaModel, cache: StaticKVCache, batch: int, *, use_cuda_graph: bool = True):
        self.lm = lm
        self.cache = cache
        self.graph = None
        device = cache.k.device
        if use_cuda_graph and device.type == "cuda":
            try:
                self._capture(batch, device)
            except Exception as e:  # capture support varies by driver/torch build; eager steps are always correct
                global _warned
                if not _warned:
                    log.warning("CUDA graph capture of the Janus decode step failed (%s); decoding eagerly.", e)
                    _warned = True
                self.graph = None

    def _capture(self, batch: int, device: torch.device) -> None:
        hidden = self.lm.config.hidden_size
        dtype = self.cache.k.dtype
        self.in_embeds = torch.zeros(batch, 1, hidden, dtype=dtype, device=device)
        self.in_positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.full((1,), self.cache.length, dtype=torch.long, device=device)
        # Warm up on a side stream (as CUDA graph capture requires); the slot written here is rewritten on replay.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.lm.forward_static_step(self.in_embeds, self.in_positions, self.cache, self.cache_position)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.lm.forward_static_step(self.in_embeds, self.in_positions, self.cache, self.cache_position)
        self.graph = graph

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.lm(embeds, positions, self.cache)
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache overflow: {self.cache.length + 1} positions in a cache of {self.cache.max_len}.")
        self.in_embeds.copy_(embeds)
        self.in_positions.copy_(positions)
        self.cache_position.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.out
