"""Jodi's caption pipeline (jodi_core.text) against the reference computation with HF Gemma2Model.

The reference is written in ``host.tiny_models.reference_caption`` straight from the official pipeline (HF
tokenizer with right padding and truncation to ``n_chi + 298``, decoder's last hidden state, BOS + last 299).
The tiny random Gemma-2 and sentencepiece model have Gemma's token layout. The ComfyUI side (Jodi Text Encode
through the real CLIPLoader) is compared with the same reference in tests/host/test_text_encode_host.py.
"""

import hashlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from host.tiny_models import load_hf_reference, reference_caption, write_tiny_gemma_folder  # noqa: E402
from jodi_core import text  # noqa: E402

PROMPTS = [
    "a red cat sleeping on a sofa",
    "A busy street at night, (neon:1.2) signs --ar 16:9",
    "",
    "mountains above a lake at sunset " * 60,  # longer than the window: truncation keeps the start
]


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    return write_tiny_gemma_folder(tmp_path_factory.mktemp("gemma") / "gemma-2-2b-it-tiny")


@pytest.fixture(scope="module")
def sdpa_reference(gemma_folder):
    return load_hf_reference(gemma_folder, attn="sdpa")


def test_chi_prompt_is_the_reference_text():
    assert len(text.CHI_PROMPT_LINES) == 8
    assert text.CHI_PROMPT.count("\n") == 7
    assert text.CHI_PROMPT.startswith('Given a user prompt, generate an "Enhanced prompt" that provides')
    assert text.CHI_PROMPT.endswith("evaluations:\nUser Prompt: ")
    # The 8 chi_prompt lines of the official configs/inference.yaml joined with "\n", as the reference joins them;
    # any changed character changes this digest.
    digest = hashlib.sha256(text.CHI_PROMPT.encode("utf-8")).hexdigest()
    assert digest == "62b9ab89eebb0ac5ee4d264bf96bf19d2b81f504bc3852500efeaf5a34d638b1"


@pytest.mark.parametrize(
    "prompt, cleaned",
    [("a cat --ar 16:9", "a cat"), ("  a cat --hw 512:1024 --ar 1:2", "a cat"),
     ("a dog --aspect_ratio 3:4", "a dog"), ("plain", "plain")])
def test_clean_prompt_drops_aspect_flags(prompt, cleaned):
    assert text.clean_prompt(prompt) == cleaned


def test_select_index_and_lengths():
    assert text.select_index(300) == list(range(300))
    assert text.select_index(305) == [0] + list(range(6, 305))
    assert text.caption_length(None) == 300
    assert text.caption_length(120) == 418
    with pytest.raises(ValueError, match="at least 300"):
        text.select_index(299)
    with pytest.raises(ValueError):
        text.caption_length(0)
    with pytest.raises(TypeError):
        text.clean_prompt(None)


@pytest.mark.parametrize("chi", [True, False], ids=["chi", "no-chi"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "flags", "empty", "long"])
def test_token_layout_matches_reference_tokenizer(sdpa_reference, prompt, chi):
    tokenizer, _ = sdpa_reference
    num_chi = len(tokenizer.encode(text.CHI_PROMPT)) if chi else None
    ours = text.layout_tokens(tokenizer.encode(text.caption_text(prompt, chi)), text.caption_length(num_chi))
    raw = prompt.split("--ar")[0].strip()
    ref = tokenizer([text.CHI_PROMPT + raw if chi else raw], max_length=text.caption_length(num_chi),
                    padding="max_length", truncation=True)
    assert ours.ids == ref.input_ids[0]
    assert ours.mask == ref.attention_mask[0]


def test_null_caption_tokens_match_reference(sdpa_reference):
    tokenizer, _ = sdpa_reference
    ref = tokenizer("", max_length=300, padding="max_length", truncation=True)
    null = text.null_caption_tokens()
    assert null.ids == ref.input_ids
    assert null.mask == ref.attention_mask


@pytest.mark.parametrize("prompt", PROMPTS[:2] + PROMPTS[3:], ids=["short", "flags", "long"])
def test_select_caption_matches_reference(sdpa_reference, prompt):
    tokenizer, encoder = sdpa_reference
    ref_emb, ref_mask, _ = reference_caption(tokenizer, encoder, prompt, chi=True)
    num_chi = len(tokenizer.encode(text.CHI_PROMPT))
    toks = text.layout_tokens(tokenizer.encode(text.caption_text(prompt)), text.caption_length(num_chi))
    with torch.no_grad():
        hidden = encoder(torch.tensor([toks.ids]), torch.tensor([toks.mask]))[0]
    emb, mask = text.select_caption(hidden, torch.tensor([toks.mask]))
    assert emb.shape == (1, 1, 300, 48) and mask.shape == (1, 300)
    torch.testing.assert_close(emb[:, 0], ref_emb, rtol=0, atol=0)
    assert torch.equal(mask, ref_mask)
    assert int(mask[0, 0]) == 1 and int(mask.sum()) > 1  # BOS kept, prompt tokens inside the window


def test_select_caption_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        text.select_caption(torch.zeros(1, 300), torch.ones(1, 300))
    with pytest.raises(ValueError, match="mask"):
        text.select_caption(torch.zeros(1, 300, 4), torch.ones(1, 299))


def test_eager_softcap_differs_only_for_large_logits(gemma_folder):
    """Where the soft-capped eager attention of HF Gemma-2 departs from the SDPA path the reference (and ComfyUI) use.

    tanh soft-capping at 50 is near the identity for small attention logits and bends large ones. With the tiny
    model's moderate logits the two agree to ~1e-2; scaling the query projections up (logits in the hundreds)
    makes them differ by O(1). So a Gemma run in eager mode with soft-capping is not a valid reference for Jodi.
    """
    prompt = PROMPTS[0]
    tok, sdpa = load_hf_reference(gemma_folder, attn="sdpa")
    _, eager_nocap = load_hf_reference(gemma_folder, attn="eager", softcap=None)
    _, eager_cap = load_hf_reference(gemma_folder, attn="eager", softcap=50.0)

    def run(enc):
        return reference_caption(tok, enc, prompt)[0]

    base, nocap, cap = run(sdpa), run(eager_nocap), run(eager_cap)
    torch.testing.assert_close(nocap, base, rtol=1e-5, atol=1e-5)  # same math, different kernels
    small_gap = (cap - base).abs().max().item()
    assert 0 < small_gap < 0.1

    with torch.no_grad():
        for enc in (sdpa, eager_cap):
            for layer in enc.layers:
                layer.self_attn.q_proj.weight.mul_(40.0)
    big_gap = (run(eager_cap) - run(sdpa)).abs().max().item()
    assert big_gap > 10 * small_gap and big_gap > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_final_norm_is_hf_gemma2s(gemma_folder, dtype):
    """The last block's output through gemma2_final_norm is HF Gemma2Model's last_hidden_state (what Jodi Text
    Encode applies to the pre-norm layer -1 state a ComfyUI host returns)."""
    tokenizer, encoder = load_hf_reference(gemma_folder, attn="sdpa")
    encoder = encoder.to(dtype)
    captured = {}
    encoder.layers[-1].register_forward_hook(
        lambda _m, _i, out: captured.update(pre=out[0] if isinstance(out, tuple) else out))
    ids = torch.tensor([tokenizer.encode("a red cat sleeping on a sofa")])
    with torch.no_grad():
        ref = encoder(ids).last_hidden_state
    ours = text.gemma2_final_norm(captured["pre"], encoder.norm.weight)
    assert ours.dtype == torch.float32
    # HF rounds its float32 result to the model dtype; ours stays float32 (the host's embeddings are float32).
    torch.testing.assert_close(ours.to(dtype), ref, rtol=0, atol=0)
    assert not torch.allclose(captured["pre"].float(), ref.float(), atol=1e-3)  # the norm does change the state
