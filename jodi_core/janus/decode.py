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


DECODE_MODES = ("auto", "eager", "static", "graph")


class DecodeStepper:
    """``stepper(embeds (B, 1, D), positions (B, 1)) -> hidden (B, 1, D)``; advances ``cache.length`` by one.

    mode: "eager" (ordinary cached steps), "static" (the fixed-shape step run eagerly: what a graph would replay),
    "graph" (capture the fixed-shape step in a CUDA graph; CUDA only, eager fallback), "auto" (graph on CUDA,
    eager elsewhere). With static steps the returned tensor is a buffer that the next call overwrites.
    """

    def __init__(self, lm: LlamaModel, cache: StaticKVCache, batch: int, *, mode: str = "auto"):
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        self.lm = lm
        self.cache = cache
        self.graph = None
        device = cache.k.device
        if mode == "auto":
            mode = "graph" if device.type == "cuda" else "eager"
        self.static = mode in ("static", "graph")
        if self.static:
            self._allocate(batch, device)
        if mode == "graph" and device.type == "cuda":
            try:
                self._capture()
            except Exception as e:  # capture support varies by driver/torch build; eager steps are always correct
                global _warned
                if not _warned:
                    log.warning("CUDA graph capture of the Janus decode step failed (%s); decoding eagerly.", e)
                    _warned = True
                self.graph = None
                self.static = False

    def _allocate(self, batch: int, device: torch.device) -> None:
        hidden = self.lm.config.hidden_size
        self.in_embeds = torch.zeros(batch, 1, hidden, dtype=self.cache.k.dtype, device=device)
        self.in_positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.full((1,), self.cache.length, dtype=torch.long, device=device)

    def _capture(self) -> None:
        device = self.cache.k.device
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
        if not self.static:
            return self.lm(embeds, positions, self.cache)
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache overflow: {self.cache.length + 1} positions in a cache of {self.cache.max_len}.")
        self.in_embeds.copy_(embeds)
        self.in_positions.copy_(positions)
        self.cache_position.fill_(self.cache.length)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self.lm.forward_static_step(self.in_embeds, self.in_positions, self.cache, self.cache_position)
        self.cache.length += 1
        return self.out
