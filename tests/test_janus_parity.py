"""Parity of jodi_core.janus with transformers' Janus (test-only reference) on a tiny random model.

The same random weights are written once per layout (original deepseek keys and HF-converted keys); our loader reads
each folder, and transformers' JanusForConditionalGeneration is built from the HF folder's config.json and weights.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration  # noqa: E402

from janus_tiny import write_tiny_janus  # noqa: E402
from jodi_core.janus import janus_generate_codes, janus_understand_tokens, load_janus  # noqa: E402
from jodi_core.janus.keys import hf_to_original, original_to_hf  # noqa: E402
from jodi_core.janus.model import positions_from_mask  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus")
    return {layout: write_tiny_janus(root / f"Janus-Tiny-{layout}", layout=layout, seed=3) for layout in ("original", "hf")}


@pytest.fixture(scope="module")
def hf_model(folders):
    from safetensors.torch import load_file

    folder = folders["hf"]
    cfg = JanusConfig(**json.loads((folder / "config.json").read_text()))
    model = JanusForConditionalGeneration(cfg).eval()
    result = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    # Only the VQ encoder (image -> codes) is absent: Janus never uses it to generate, and we do not build it.
    assert result.unexpected_keys == []
    assert all(k.startswith(("model.vqmodel.encoder.", "model.vqmodel.quant_conv.")) for k in result.missing_keys)
    return model


@pytest.fixture(scope="module", params=["original", "hf"])
def ours(request, folders):
    return load_janus(folders[request.param], dtype=torch.float32)


def _images(seed: int):
    g = torch.Generator().manual_seed(seed)
    # Different sizes and aspect ratios exercise resize + pad-to-square.
    return [torch.rand(3, 20, 12, generator=g), torch.rand(3, 16, 16, generator=g), torch.rand(3, 9, 30, generator=g)]


def test_both_layouts_load_identical_weights(folders):
    a = load_janus(folders["original"]).state_dict()
    b = load_janus(folders["hf"]).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_key_mapping_round_trips_hf_model_state_dict(hf_model):
    """HF -> original -> HF reproduces every tensor of transformers' own model (VQ encoder included)."""
    hf_sd = hf_model.state_dict()
    back = original_to_hf(hf_to_original(hf_sd))
    assert back.keys() == hf_sd.keys()
    for k in hf_sd:
        torch.testing.assert_close(back[k], hf_sd[k], rtol=0, atol=0, msg=k)
    orig = hf_to_original(hf_sd)
    # Spot-check the original names the deepseek checkpoints use.
    for key in (
        "vision_model.vision_tower.blocks.1.attn.qkv.weight",
        "vision_model.vision_tower.pos_embed",
        "gen_vision_model.decoder.conv_blocks.0.res.1.conv2.weight",
        "gen_vision_model.decoder.conv_blocks.0.attn.0.q.weight",
        "gen_vision_model.decoder.conv_blocks.0.upsample.conv.weight",
        "gen_vision_model.decoder.mid.1.proj_out.weight",
        "gen_vision_model.encoder.conv_blocks.0.downsample.conv.weight",
        "gen_head.output_mlp_projector.weight",
        "aligner.layers.2.bias",
        "language_model.lm_head.weight",
    ):
        assert key in orig, key
    assert orig["vision_model.vision_tower.pos_embed"].ndim == 3


def test_prompt_logits_match(ours, hf_model):
    """Mixed image + text prompts, batch of 2 with left padding, one row holding two images."""
    images = _images(0)
    batch = ours.processor.understanding_batch(
        ["What is in the picture?", "Compare these two images in detail please."], [[images[0]], images[1:]]
    )
    assert not batch.attention_mask[0].all()  # row 0 is shorter: left padding is exercised
    with torch.no_grad():
        logits = ours(batch.input_ids, batch.pixels, batch.image_token_mask, batch.attention_mask)
        ref = hf_model(
            input_ids=batch.input_ids,
            pixel_values=batch.pixels,
            attention_mask=batch.attention_mask.long(),
            position_ids=positions_from_mask(batch.attention_mask, batch.input_ids.shape),
        ).logits
    real = batch.attention_mask
    torch.testing.assert_close(logits[real], ref[real], rtol=0, atol=1e-4)
    assert logits[real].std() > 0.1  # a non-trivial comparison


def _hf_text_generate(hf_model, batch, max_new_tokens, **kwargs):
    out = hf_model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask.long(),
        pixel_values=batch.pixels,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # random weights: do not let an early EOS shorten the comparison
        **kwargs,
    )
    return out[:, batch.input_ids.shape[1] :].tolist()


def test_greedy_captions_token_identical(ours, hf_model):
    images = _images(1)
    questions = ["Describe this image.", "How many people are there in this picture?"]
    rows = [[images[0]], images[1:]]
    ids = janus_understand_tokens(ours, rows, questions, max_new_tokens=12, do_sample=False)
    batch = ours.processor.understanding_batch(questions, rows)
    ref = _hf_text_generate(hf_model, batch, 12, do_sample=False)
    eos = ours.processor.tokenizer.eos_id
    for mine, theirs in zip(ids, ref):
        theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
        assert mine == theirs
        assert len(mine) > 0


def test_sampled_captions_token_identical_with_same_seed(ours, hf_model):
    """Same seed, same sampling rule (temperature, top-k, top-p) -> the same multinomial draws on CPU."""
    images = _images(2)
    questions = ["Describe this image in detail.", "What is in the picture?"]
    rows = [[images[0]], [images[2]]]
    kw = dict(temperature=0.7, top_p=0.8, top_k=20)
    ids = janus_understand_tokens(ours, rows, questions, max_new_tokens=10, do_sample=True, seed=123, **kw)
    batch = ours.processor.understanding_batch(questions, rows)
    torch.manual_seed(123)
    ref = _hf_text_generate(hf_model, batch, 10, do_sample=True, **kw)
    eos = ours.processor.tokenizer.eos_id
    for mine, theirs in zip(ids, ref):
        assert mine == (theirs[: theirs.index(eos)] if eos in theirs else theirs)


def _hf_image_generate(hf_model, ours, prompt, parallel, do_sample, seed=0, temperature=1.0, cfg_weight=5.0):
    tok = ours.processor.tokenizer
    # P identical prompt rows (num_return_sequences > 1 is refused for greedy decoding).
    ids = torch.tensor([ours.processor.generation_ids(prompt)]).repeat(parallel, 1)
    config = GenerationConfig(
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        guidance_scale=cfg_weight,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        generation_kwargs={"boi_token_id": tok.boi_id},
    )
    torch.manual_seed(seed)
    return hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=config
    )


def test_image_generation_greedy_tokens_identical(ours, hf_model):
    # cfg 2: with these random weights a larger guidance collapses greedy decoding onto a single code.
    codes = janus_generate_codes(ours, "A cat sitting on a red chair", cfg_weight=2.0, temperature=0, parallel_size=2)
    ref = _hf_image_generate(hf_model, ours, "A cat sitting on a red chair", 2, do_sample=False, cfg_weight=2.0)
    assert codes.shape == ref.shape == (2, ours.config.gen_image_tokens)
    assert codes.tolist() == ref.tolist()
    assert len(set(codes[0].tolist())) > 2  # not a degenerate constant sequence


def test_image_generation_sampled_tokens_identical_with_same_seed(ours, hf_model):
    codes = janus_generate_codes(ours, "A dog runs on the beach", temperature=1.0, parallel_size=3, seed=7)
    ref = _hf_image_generate(hf_model, ours, "A dog runs on the beach", parallel=3, do_sample=True, seed=7)
    assert codes.tolist() == ref.tolist()
    assert codes[0].tolist() != codes[1].tolist()  # parallel samples differ


def test_vq_decode_matches(ours, hf_model):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, ours.config.vq.codebook_size, (2, ours.config.gen_image_tokens), generator=g)
    with torch.no_grad():
        mine = ours.gen_vision_model.decode_codes(codes)
        ref = hf_model.decode_image_tokens(codes).permute(0, 3, 1, 2)  # HF returns NHWC in [-1, 1]
    assert mine.shape == (2, 3, ours.config.gen_image_size, ours.config.gen_image_size)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-4)


def test_image_preprocessing_matches_transformers_processor():
    """Our preprocessing vs transformers' PIL JanusImageProcessor (longest-side bicubic resize, mean-colour pad,
    rescale, normalise) at the real 384 size: identical up to float rounding."""
    from PIL import Image
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    from jodi_core.janus.processor import ImagePreprocessConfig, preprocess_image

    cfg = ImagePreprocessConfig(image_size=384)
    proc = JanusImageProcessorPil(
        size={"height": 384, "width": 384}, min_size=14, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    g = torch.Generator().manual_seed(9)
    for h, w in ((480, 640), (384, 384), (1000, 300), (50, 70), (10, 600)):  # the last hits min_size
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        pil = Image.fromarray(arr)
        ref = proc(images=[pil], return_tensors="pt")["pixel_values"][0]
        mine = preprocess_image(pil, cfg)
        assert mine.shape == ref.shape == (3, 384, 384)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["janus-pro-1b", "janus-pro-7b"])
def test_real_sized_layouts_on_meta(preset):
    """At the released sizes (built on the meta device, no memory): our original-layout keys map onto exactly the
    keys and shapes of transformers' model, and the configuration is read back from the shapes."""
    from jodi_core.janus.config import PRESETS, config_from_state_dict
    from jodi_core.janus.model import JanusModel

    cfg = PRESETS[preset]
    with torch.device("meta"):
        ours = JanusModel(cfg)
        lm = cfg.language
        hf = JanusForConditionalGeneration(
            JanusConfig(
                text_config=dict(
                    model_type="llama", vocab_size=lm.vocab_size, hidden_size=lm.hidden_size,
                    intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
                    num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
                ),
                vision_config=dict(projection_dim=lm.hidden_size),
                vq_config=dict(projection_dim=lm.hidden_size, image_token_embed_dim=lm.hidden_size),
                tie_word_embeddings=False,
            )
        )  # fmt: skip
    sd = ours.state_dict()
    assert config_from_state_dict(sd) == cfg  # head counts from the table of released widths
    mapped = original_to_hf(sd)
    ref = {k: v for k, v in hf.state_dict().items() if not k.startswith(("model.vqmodel.encoder.", "model.vqmodel.quant_conv."))}
    assert mapped.keys() == ref.keys()
    assert all(mapped[k].shape == ref[k].shape for k in ref)
