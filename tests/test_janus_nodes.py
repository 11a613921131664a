"""The Janus nodes without ComfyUI: the pack loaded against the ComfyUI stand-in of test_nodes_unit.py, running the
real jodi_core.janus engine on a tiny random model folder (tests/janus_tiny.py).

Expected answers come from calling the engine directly on the same weights; the nodes must give exactly those (so
layout conversions, presets, batching and seeds are checked, not the model's quality).
"""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from janus_tiny import write_tiny_janus
from jodi_core.janus import UNDERSTAND_CHUNK, janus_generate, janus_understand, load_janus
from test_nodes_unit import _Events, install_pack, pack_nodes, unload_pack


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_janus(tmp_path_factory.mktemp("janus") / "Janus-Tiny", layout="original", seed=0)


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """The same tiny model loaded straight through the engine (float32, CPU)."""
    return load_janus(tiny_folder, dtype=torch.float32)


@pytest.fixture
def pack(tmp_path, monkeypatch, tiny_folder):
    models = tmp_path / "models"
    for d in ("jodi", "dm", "vae"):
        (models / d).mkdir(parents=True)
    janus_root = models / "Janus-Pro"
    shutil.copytree(tiny_folder, janus_root / "Janus-Tiny")
    shutil.copytree(tiny_folder, janus_root / "deepseek-ai" / "Janus-Nested")
    (janus_root / "not-a-model").mkdir()
    (janus_root / "not-a-model" / "readme.txt").write_text("x")
    events = _Events()
    name, module = install_pack(tmp_path, monkeypatch, models, events)
    yield types.SimpleNamespace(nodes=pack_nodes(module), events=events, root=janus_root,
                                mm=sys.modules["comfy.model_management"], janus=sys.modules[name + ".nodes.janus"])
    unload_pack(name)


def _load(pack, name="Janus-Tiny", dtype="auto"):
    return pack.nodes["JanusLoader"].execute(name, dtype).result[0]


def _image(batch=2, h=20, w=12, seed=0):
    """ComfyUI IMAGE (B, H, W, 3); not square, so a wrong permute would change the picture the model sees."""
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Schemas and the loader
# ---------------------------------------------------------------------------------------------------------------------


def test_janus_nodes_are_registered_and_documented(pack):
    janus_nodes = {k: v for k, v in pack.nodes.items() if k.startswith("Janus")}
    assert set(janus_nodes) == {"JanusLoader", "JanusCaption", "JanusAsk", "JanusGenerate"}
    for node_id, cls in janus_nodes.items():
        schema = cls.define_schema()
        assert schema.category.startswith("Janus/") and len(schema.description) > 60, node_id
        for rec in schema.inputs + schema.outputs:
            assert rec.kwargs.get("tooltip"), f"{node_id}.{rec.id}"
    caption_out = pack.nodes["JanusCaption"].define_schema().outputs[0]
    assert caption_out.io_type == "STRING" and caption_out.kwargs["is_output_list"] is True


def test_loader_lists_model_folders_only(pack):
    combo = pack.nodes["JanusLoader"].define_schema().inputs[0]
    assert combo.kwargs["options"] == ["Janus-Tiny", "deepseek-ai/Janus-Nested"]
    loader = pack.nodes["JanusLoader"]
    assert loader.validate_inputs(model_name="Janus-Tiny", dtype="fp32") is True
    assert "model_name must be one of" in loader.validate_inputs(model_name="not-a-model")
    assert "dtype must be one of" in loader.validate_inputs(dtype="int8")
    with pytest.raises(FileNotFoundError, match="not found"):
        loader.execute("not-a-model", "auto")
    with pytest.raises(ValueError, match="folder name"):
        loader.execute("../Janus-Pro/Janus-Tiny", "auto")


def test_loader_reports_an_empty_models_folder(pack):
    shutil.rmtree(pack.root)
    msg = pack.nodes["JanusLoader"].validate_inputs(model_name="Janus-Tiny")
    assert "No Janus model folder found" in msg and "Janus-Pro" in msg


def test_loader_wraps_the_model_for_memory_management(pack, reference):
    patcher = _load(pack, "deepseek-ai/Janus-Nested", "auto")
    model = patcher.model.module  # the ManagedModule keeps the JanusModel's read-only .device intact
    assert type(model).__name__ == "JanusModel" and model.dtype == torch.float32  # auto on CPU: fp32
    assert patcher.load_device == torch.device("cpu") and model.processor is not None
    assert patcher.model.get_dtype() == torch.float32
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name
    assert _load(pack, dtype="bf16").model.module.dtype == torch.bfloat16


@pytest.mark.parametrize("bf16, fp16, expected", [(True, True, torch.bfloat16), (False, True, torch.float16),
                                                   (False, False, torch.float32)])
def test_loader_auto_dtype_follows_comfy(pack, monkeypatch, bf16, fp16, expected):
    monkeypatch.setattr(pack.mm, "should_use_bf16", lambda device=None, **_: bf16, raising=False)
    monkeypatch.setattr(pack.mm, "should_use_fp16", lambda device=None, **_: fp16, raising=False)
    assert pack.janus._auto_dtype(torch.device("meta")) is expected
    assert pack.janus._auto_dtype(torch.device("cpu")) is torch.float32


def test_loader_fingerprint_follows_the_files(pack):
    loader = pack.nodes["JanusLoader"]
    before = loader.fingerprint_inputs("Janus-Tiny", "auto")
    assert before == loader.fingerprint_inputs("Janus-Tiny", "auto")
    cfg = pack.root / "Janus-Tiny" / "config.json"
    stat = cfg.stat()
    os.utime(cfg, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert loader.fingerprint_inputs("Janus-Tiny", "auto") != before


# ---------------------------------------------------------------------------------------------------------------------
# Caption and Ask
# ---------------------------------------------------------------------------------------------------------------------


def test_caption_matches_the_engine_per_image(pack, reference):
    patcher = _load(pack)
    image = _image(batch=2)
    out = pack.nodes["JanusCaption"].execute(patcher, image, "detailed", 12)
    captions = out.result[0]
    question = pack.janus.CAPTION_PRESETS["detailed"][0]
    expected = janus_understand(reference, image.permute(0, 3, 1, 2), question, max_new_tokens=12)
    assert captions == [e.strip() for e in expected] and len(captions) == 2
    assert out.ui == {"text": captions}
    # Memory management saw the patcher with room for the KV cache; the bar counted tokens.
    loaded, need = pack.events.loaded[-1]
    assert loaded == [patcher] and need > 0
    assert pack.events.progress[-1][:2] == (12, 12)



def test_fp8_weights_reserve_room_for_their_cast_copy(pack):
    fp8 = pack.nodes["JanusLoader"].execute("Janus-Tiny", "auto", "fp8_e4m3fn").result[0]
    plain = _load(pack)
    needs = []
    for patcher in (plain, fp8):
        pack.nodes["JanusCaption"].execute(patcher, _image(batch=1), "brief", 4)
        needs.append(pack.events.loaded[-1][1])
    model = fp8.model.module
    largest = max(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    assert needs[1] - needs[0] == largest * 4  # a float32 copy (auto dtype on the CPU), kv caches alike

def test_caption_presets_differ_and_fold_to_one_line(pack, reference):
    patcher = _load(pack)
    image = _image(batch=1, seed=3)
    node = pack.nodes["JanusCaption"]
    jodi = node.execute(patcher, image, "for a Jodi prompt", 24).result[0][0]
    question = pack.janus.CAPTION_PRESETS["for a Jodi prompt"][0]
    raw = janus_understand(reference, image.permute(0, 3, 1, 2), question, max_new_tokens=24)[0]
    assert jodi == pack.janus._one_line(raw) and "\n" not in jodi
    assert pack.janus._one_line('  "a cat\n\n on  a mat"  ') == "a cat on a mat"
    assert "detail must be one of" in node.validate_inputs(detail="verbose")
    assert "max_new_tokens" in node.validate_inputs(max_new_tokens=0)
    with pytest.raises(ValueError, match="detail must be one of"):
        node.execute(patcher, image, "verbose", 8)


def test_caption_presets_come_from_jodi_core_and_match_the_captioner(pack, reference):
    """One set of presets (jodi_core.captioning), shared with the folder annotator, whose Captioner gives the node's
    caption for the same picture."""
    from jodi_core.captioning import CAPTION_PRESETS, Captioner

    assert pack.janus.CAPTION_PRESETS == CAPTION_PRESETS
    assert CAPTION_PRESETS["brief"][0] not in Path(pack.janus.__file__).read_text()  # imported, not defined again
    patcher = _load(pack)
    image = _image(batch=2, seed=6)
    for style in CAPTION_PRESETS:
        captions = pack.nodes["JanusCaption"].execute(patcher, image, style, 10).result[0]
        assert captions == [Captioner(reference, style, 10).caption(image[i].permute(2, 0, 1), f"k{i}")
                            for i in range(2)], style


def test_caption_batches_in_chunks_like_single_images(pack, reference):
    patcher = _load(pack)
    n = UNDERSTAND_CHUNK + 1
    image = _image(batch=n, seed=5)
    captions = pack.nodes["JanusCaption"].execute(patcher, image, "brief", 6).result[0]
    question = pack.janus.CAPTION_PRESETS["brief"][0]
    alone = janus_understand(reference, image[-1:].permute(0, 3, 1, 2), question, max_new_tokens=6)[0]
    assert len(captions) == n and captions[-1] == pack.janus._one_line(alone)
    values = [v for v, total, _ in pack.events.progress if total == 12]  # 2 chunks x 6 tokens
    assert values == sorted(values) and 7 in values and values[-1] == 12  # chunk 2 continues the bar


def test_answer_length_is_capped_to_the_context(pack, reference, caplog):
    patcher = _load(pack)
    image = _image(batch=1, seed=4)
    question = pack.janus.CAPTION_PRESETS["detailed"][0]
    batch = reference.processor.understanding_batch([question], [[image[0].permute(2, 0, 1)]])
    room = reference.config.language.max_position_embeddings - batch.input_ids.shape[1]
    assert reference.answer_room([question], [1]) == room  # the counted prompt is the one the processor builds
    with caplog.at_level("WARNING"):
        caption = pack.nodes["JanusCaption"].execute(patcher, image, "detailed", 4000).result[0]
    assert "does not fit the model's context" in caplog.text
    expected = janus_understand(reference, image.permute(0, 3, 1, 2), question, max_new_tokens=room)
    assert caption == [e.strip() for e in expected]
    with pytest.raises(ValueError, match="whole context"):
        reference.answer_room([question], [40])  # 40 x 16 image tokens > 512


def test_ask_modes(pack, reference):
    patcher = _load(pack)
    ask = pack.nodes["JanusAsk"]
    image = _image(batch=2, seed=7)
    settings = dict(do_sample=False, temperature=1.0, top_p=0.95, max_new_tokens=10, repetition_penalty=1.0, seed=0)
    per_image = ask.execute(patcher, "What is in the picture?", image, False, **settings).result[0]
    assert per_image == [a.strip() for a in janus_understand(
        reference, image.permute(0, 3, 1, 2), "What is in the picture?", max_new_tokens=10)]
    together = ask.execute(patcher, "What is in the picture?", image, True, **settings).result[0]
    assert together == [janus_understand(reference, [image.permute(0, 3, 1, 2)], "What is in the picture?",
                                         max_new_tokens=10)[0].strip()]
    text_only = ask.execute(patcher, "How many people are there?", None, False, **settings).result[0]
    assert text_only == [janus_understand(reference, None, "How many people are there?",
                                          max_new_tokens=10)[0].strip()]


def test_ask_sampling_follows_the_seed(pack, reference):
    patcher = _load(pack)
    ask = pack.nodes["JanusAsk"]
    image = _image(batch=1, seed=9)
    kw = dict(do_sample=True, temperature=1.5, top_p=1.0, max_new_tokens=16, repetition_penalty=1.2)
    a = ask.execute(patcher, "Describe this image in detail.", image, False, seed=11, **kw).result[0]
    b = ask.execute(patcher, "Describe this image in detail.", image, False, seed=11, **kw).result[0]
    expected = janus_understand(reference, image.permute(0, 3, 1, 2), "Describe this image in detail.", seed=11,
                                **kw)
    assert a == b == [e.strip() for e in expected]
    others = {ask.execute(patcher, "Describe this image in detail.", image, False, seed=s, **kw).result[0][0]
              for s in range(12, 16)}
    assert len(others | {a[0]}) > 1  # a random tiny model sampled at temperature 1.5: seeds change the answer
    # Rows beyond the first chunk draw their own numbers: the same image in every row gives different answers.
    chunk = UNDERSTAND_CHUNK
    rows = _image(batch=1, seed=9).expand(2 * chunk, -1, -1, -1)
    answers = ask.execute(patcher, "Describe this image in detail.", rows, False, seed=11, **kw).result[0]
    assert answers[:chunk] != answers[chunk:]  # two equal chunks, yet not the same draws


def test_ask_input_errors(pack):
    patcher = _load(pack)
    ask = pack.nodes["JanusAsk"]
    assert "top_p must be between" in ask.validate_inputs(top_p=0.0)
    assert "repetition_penalty must be between" in ask.validate_inputs(repetition_penalty=0.5)
    assert ask.validate_inputs(temperature=None, top_p=0.9, max_new_tokens=None) is True  # linked: None
    with pytest.raises(ValueError, match="question is empty"):
        ask.execute(patcher, "   ")
    with pytest.raises(ValueError, match="temperature must be between"):
        ask.execute(patcher, "Why?", temperature=3.0)
    with pytest.raises(ValueError, match="IMAGE shaped"):
        ask.execute(patcher, "Why?", torch.rand(1, 3, 8, 8, 2))
    with pytest.raises(TypeError, match="Janus Loader"):
        ask.execute(object(), "Why?")


def test_nodes_refuse_a_jodi_model(pack):
    fake = types.SimpleNamespace(model=pack.janus.common.ManagedModule(torch.nn.Linear(2, 2)),
                                 load_device=torch.device("cpu"))
    with pytest.raises(TypeError, match="Janus Loader"):
        pack.nodes["JanusGenerate"].execute(fake, "a cat")


# ---------------------------------------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------------------------------------


def test_generate_matches_the_engine_and_reports_progress(pack, reference):
    patcher = _load(pack)
    gen = pack.nodes["JanusGenerate"]
    image = gen.execute(patcher, "a dog runs on the beach", cfg=5.0, temperature=1.0, seed=3, batch_size=2).result[0]
    size = reference.config.gen_image_size
    assert image.shape == (2, size, size, 3) and image.dtype == torch.float32
    expected = janus_generate(reference, "a dog runs on the beach", cfg_weight=5.0, temperature=1.0,
                              parallel_size=2, seed=3)
    assert torch.equal(image, expected.permute(0, 2, 3, 1))  # (B, 3, S, S) -> ComfyUI's (B, S, S, 3)
    n = reference.config.gen_image_tokens
    assert [p[:2] for p in pack.events.progress[-n:]] == [(i + 1, n) for i in range(n)]
    other = gen.execute(patcher, "a dog runs on the beach", cfg=5.0, temperature=1.0, seed=4, batch_size=2)
    assert not torch.equal(other.result[0], image)


def test_generate_can_be_interrupted(pack):
    patcher = _load(pack)
    pack.events.interrupt_after = 5  # ComfyUI's interrupt flag goes up during the token loop
    with pytest.raises(sys.modules["comfy.model_management"].InterruptProcessingException):
        pack.nodes["JanusGenerate"].execute(patcher, "a cat", cfg=5.0, temperature=1.0, seed=0, batch_size=1)
    assert 0 < len(pack.events.progress) < 16


def test_generate_input_errors(pack):
    gen = pack.nodes["JanusGenerate"]
    assert "batch_size must be between 1 and 16" in gen.validate_inputs(batch_size=17)
    assert "cfg must be between" in gen.validate_inputs(cfg=-1.0)
    assert gen.validate_inputs(cfg=5.0, temperature=1.0, seed=1, batch_size=4) is True
    with pytest.raises(ValueError, match="batch_size"):
        gen.execute(_load(pack), "a cat", batch_size=0)
    with pytest.raises(TypeError, match="prompt must be a string"):
        gen.execute(_load(pack), ["a cat"])
    assert "needs a prompt" in gen.validate_inputs(prompt="  ")
    with pytest.raises(ValueError, match="needs a prompt"):
        gen.execute(_load(pack), "")
