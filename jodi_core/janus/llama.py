"""LLaMA decoder (Janus' language model) with a static, preallocated KV cache and SDPA attention.

Attribute names follow the original checkpoint under ``language_model.``: ``model.embed_tokens``,
``model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}``,
``model.norm`` and ``lm_head``. Janus' language_config is partial, so RoPE is the plain one (theta 10000, no
scaling) and RMSNorm eps is 1e-6 unless config.json says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig


class StaticKVCache:
    """Keys and values of every layer in one buffer allocated up front, so decoding never reallocates.

    ``k``/``v``: (layers, B, kv_heads, max_len, head_dim). ``length`` is the number of filled positions;
    ``key_mask`` (B, max_len) marks positions that may be attended (False for left padding).
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"The sequence would be {max_len} tokens long, more than the model's "
                f"{cfg.max_position_embeddings} positions; shorten the prompt or max_new_tokens."
            )
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.length = 0
        self.max_len = max_len

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Record which prompt positions are padding; generated positions stay attendable."""
        t = attention_mask.shape[1]
        self.key_mask[:, :t] = attention_mask.bool()
        self.has_padding = bool((~self.key_mask[:, :t]).any())

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions in a cache of {self.max_len}.")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write_at(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step at a position held in a device tensor and return the whole buffer (fixed shapes, so the
        step can be captured in a CUDA graph; ``static_step_mask`` hides the unwritten tail)."""
        self.k[layer].index_copy_(2, cache_position, k)
        self.v[layer].index_copy_(2, cache_position, v)
        return self.k[layer], self.v[layer]

    def static_step_mask(self, cache_position: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, max_len) bool: positions up to ``cache_position`` that are not padding."""
        filled = torch.arange(self.max_len, device=self.key_mask.device) <= cache_position
        return (self.key_mask & filled)[:, None, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding:
    """cos/sin tables for integer positions, computed in fp32 (as the reference) and cast to the activation dtype."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
            inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
            self._inv_freq[positions.device] = inv_freq
        freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the reference's rounding order in bf16.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = operations.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, **kw)
        self.k_proj = operations.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, **kw)
        self.v_proj = operations.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, **kw)
        self.o_proj = operations.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, **kw)

    def forward(self, x, cos, sin, cache: StaticKVCache | None, attn_mask, is_causal: bool, cache_position=None):
        b, t, _ = x.shape
        # (B, T, heads*hd) -> (B, heads, T, hd)
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache_position is not None:
            k, v = cache.write_at(self.layer_idx, k, v, cache_position)
        elif cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = operations.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = operations.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = operations.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = LlamaAttention(cfg, layer_idx, operations=operations, **kw)
        self.mlp = LlamaMLP(cfg, operations=operations, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def forward(self, x, cos, sin, cache, attn_mask, is_causal, cache_position=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask, is_causal, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Decoder stack without the LM head: inputs_embeds (B, T, D) -> final-normed hidden states (B, T, D)."""

    def __init__(self, cfg: LlamaConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.config = cfg
        self.embed_tokens = operations.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, operations=operations, **kw) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: StaticKVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``T`` new positions after the ``cache.length`` cached ones (all of them if no cache).

        position_ids (B, T): rotary positions (with left padding they start at 0 on each row's first real token).
        attention_mask (B, T) bool/int: only without a cache, False/0 marks padding. With a cache, padding is
        recorded once via ``cache.set_padding``.
        """
        b, t, _ = inputs_embeds.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + t > cache.max_len:
            raise ValueError(f"KV cache overflow: {start + t} positions in a cache of {cache.max_len}.")
        attn_mask, is_causal = self._attention_mask(b, t, start, cache, attention_mask, inputs_embeds.device)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask, is_causal)
        if cache is not None:
            cache.length = start + t
        return self.norm(x)

    def forward_static_step(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache, cache_position: torch.Tensor
    ) -> torch.Tensor:
        """One decode step with fixed shapes and no host synchronisation (CUDA-graph capturable).

        inputs_embeds (B, 1, D); position_ids (B, 1) rotary positions; cache_position (1,) long: the cache slot to
        write, on the model's device. Attends over the whole cache with the tail masked. Does not advance
        ``cache.length``: the caller owns the step counter.
        """
        attn_mask = cache.static_step_mask(cache_position)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask, False, cache_position)
        return self.norm(x)

    @staticmethod
    def _attention_mask(b, t, start, cache, attention_mask, device) -> tuple[torch.Tensor | None, bool]:
        """Boolean (B, 1, T, L) mask, True = attend; None plus is_causal when SDPA's own masking is exact."""
        total = start + t
        if cache is not None:
            key_mask = cache.key_mask[:, :total] if cache.has_padding else None
        else:
            key_mask = attention_mask.bool() if attention_mask is not None and not attention_mask.all() else None
        if key_mask is None:
            if t == 1:
                return None, False  # one new query may see every cached position
            if start == 0:
                return None, True
        q_pos = torch.arange(start, total, device=device)
        allowed = torch.arange(total, device=device)[None, :] <= q_pos[:, None]  # (T, L) causal
        mask = allowed[None, None].expand(b, 1, t, total)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
            # A padded query position would see no key at all (NaN softmax whose values then leak into the cache):
            # let it see itself.
            mask = mask | (torch.arange(total, device=device)[None, :] == q_pos[:, None])[None, None]
        return mask, False


class LlamaForCausalLM(nn.Module):
    """``language_model.`` in the original checkpoint: the decoder stack plus the text LM head."""

    def __init__(self, cfg: LlamaConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.model = LlamaModel(cfg, dtype=dtype, device=device, operations=operations)
        self.lm_head = operations.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
