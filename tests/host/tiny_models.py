"""Tiny random-weight models in the official file formats, shared by the text-encoder and host tests.

- a sentencepiece model laid out like Gemma's (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, byte fallback,
  no normalisation, no dummy prefix), trained in a few milliseconds on the CHI text and a few prompts;
- a Gemma-2 in Hugging Face folder format (sharded ``model-*.safetensors`` + index, ``config.json``,
  ``tokenizer.model``, ``tokenizer_config.json`` with a chat template like the -it repo), hidden size 48 so that its
  captions fit the tiny Jodi DiT (``caption_channels`` 48).

Hugging Face ``transformers`` is a test-only dependency; it is imported inside the functions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from jodi_core.text import CHI_PROMPT

TINY_PROMPTS = (
    "a red cat sleeping on a sofa",
    "A busy street at night, 35mm photo, (neon:1.2) signs",
    "mountains above a lake at sunset",
)

# Sizes of the tiny Gemma-2. head_dim and the query scale must agree between HF (query_pre_attn_scalar) and
# ComfyUI (which scales by head_dim**-0.5, as the real model does with 256 == head_dim).
# At least 3 layers: ComfyUI asserts its default layer index -2 is inside the model.
TINY_GEMMA = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
)
TINY_VOCAB = 384


def train_tiny_spm(vocab_size: int = TINY_VOCAB) -> bytes:
    """Serialized sentencepiece model with Gemma's special-token layout."""
    import sentencepiece as spm

    corpus = [CHI_PROMPT, *TINY_PROMPTS] * 2
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    return out.getvalue()


def tiny_gemma_config(vocab_size: int = TINY_VOCAB, softcap: float | None = None):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size, query_pre_attn_scalar=TINY_GEMMA["head_dim"], attn_logit_softcapping=softcap,
        final_logit_softcapping=None, sliding_window=4096, hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, **TINY_GEMMA)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Overwrite every parameter with seeded noise (norm weights too, so no norm is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            scale = 0.3 if "norm" in name else std
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def write_tiny_gemma_folder(folder: Path, seed: int = 0, shard_size: str = "40KB") -> Path:
    """A Hugging Face gemma-2-2b-it-like folder holding the tiny random model and tokenizer."""
    from transformers import Gemma2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = Gemma2ForCausalLM(tiny_gemma_config())
    randomize_(model, seed)
    model.save_pretrained(folder, max_shard_size=shard_size, safe_serialization=True)
    (folder / "tokenizer.model").write_bytes(train_tiny_spm())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "pad_token": "<pad>",
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }))
    return folder


def comfy_gemma_overrides() -> dict:
    """What the host's probe pack puts into ComfyUI's Gemma-2-2B config so it builds the tiny model."""
    return {"vocab_size": TINY_VOCAB, **TINY_GEMMA}


def load_hf_reference(folder: Path, attn: str = "sdpa", softcap: float | None = None, dtype=torch.float32):
    """(tokenizer, Gemma2Model) from a tiny folder, the way the reference builds them (decoder of the causal LM).

    ``attn="sdpa"`` reproduces the reference's transformers 4.49 default, whose SDPA path has no logit soft-capping;
    ``attn="eager"`` with ``softcap=50.0`` is the soft-capped attention of the original Gemma-2.
    """
    from transformers import AutoTokenizer, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"
    config = tiny_gemma_config(softcap=softcap)
    model = Gemma2ForCausalLM.from_pretrained(folder, config=config, torch_dtype=dtype, attn_implementation="eager")
    if attn == "sdpa":
        if softcap is not None:
            raise ValueError("SDPA has no soft-capping")
        # transformers 5 refuses SDPA for Gemma-2 up front because of soft-capping; without it the SDPA path is the
        # one the reference ran, so switch the implementation after loading.
        model.config._attn_implementation = "sdpa"
        for sub in model.modules():
            if hasattr(sub, "config") and sub is not model:
                sub.config._attn_implementation = "sdpa"
    return tokenizer, model.get_decoder().eval()


@torch.no_grad()
def reference_caption(tokenizer, encoder, prompt: str, chi: bool = True, max_length: int = 300):
    """The reference's caption computation, written from its pipeline with HF tokenizer + Gemma2Model.

    Returns (1, 300, C) float32 embedding, (1, 300) mask and the (1, L) token ids that went in.
    """
    prompt = prompt.split("--aspect_ratio")[0].split("--ar")[0].split("--hw")[0].strip()
    if chi:
        text = CHI_PROMPT + prompt
        length = len(tokenizer.encode(CHI_PROMPT)) + max_length - 2
    else:
        text, length = prompt, max_length
    tok = tokenizer([text], max_length=length, padding="max_length", truncation=True, return_tensors="pt")
    hidden = encoder(tok.input_ids, tok.attention_mask)[0]
    index = [0] + list(range(-max_length + 1, 0))
    return hidden[:, index].float(), tok.attention_mask[:, index], tok.input_ids


def round_like_comfy_bf16_(encoder: torch.nn.Module) -> None:
    """Make an fp32 HF Gemma-2 compute what ComfyUI computes from a bf16 file.

    ComfyUI computes in float32 from bf16 weights, with one exception: its Gemma RMSNorm forms ``1 + w`` in the
    weight dtype, so the norm scales are rounded to bf16. HF forms ``1 + w`` in float32. Rounding the weights,
    then storing ``bf16(1 + w) - 1`` as the norm weights, reproduces ComfyUI's numbers exactly in HF. The final
    norm is the exception: Jodi Text Encode applies it itself, in float32 as HF does (jodi_core.text).
    """
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            w = p.to(torch.bfloat16)
            if "norm" in name and name != "norm.weight":
                p.copy_((1.0 + w).to(torch.bfloat16).float() - 1.0)
            else:
                p.copy_(w.float())
