"""convert-gemma: a sharded Hugging Face Gemma-2 folder -> one bf16 safetensors file with the tokenizer inside.

Uses a tiny random Gemma-2 and a sentencepiece model trained by the test. That the file loads through ComfyUI's real
CLIPLoader is checked in tests/host/test_text_encode_host.py.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from host.tiny_models import write_tiny_gemma_folder  # noqa: E402
from jodi_core.checkpoint import CheckpointError  # noqa: E402
from jodi_core.gemma import SPIECE_KEY, convert_gemma  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_tiny_gemma_folder(tmp_path_factory.mktemp("hf") / "gemma-2-2b-it-tiny")


def _hf_tensors(folder):
    out = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(shard))
    return out


def test_merges_shards_to_bf16_with_tokenizer(hf_folder, tmp_path):
    assert len(list(hf_folder.glob("model-*.safetensors"))) > 1  # really sharded
    out = convert_gemma(hf_folder, tmp_path / "gemma.safetensors")
    sd = load_file(out)
    src = _hf_tensors(hf_folder)
    expected = {k for k in src if not k.startswith("lm_head.")}
    assert set(sd) == expected | {SPIECE_KEY}
    for key in expected:
        assert sd[key].dtype == torch.bfloat16, key
        assert torch.equal(sd[key], src[key].to(torch.bfloat16)), key
    # ComfyUI recognises Gemma-2-2B by these keys (detect_te_model) and reads the dtype from model.norm.weight.
    assert "model.layers.0.post_feedforward_layernorm.weight" in sd
    assert "model.layers.0.self_attn.q_norm.weight" not in sd
    spiece = sd[SPIECE_KEY]
    assert spiece.dtype == torch.uint8 and spiece.ndim == 1
    assert spiece.numpy().tobytes() == (hf_folder / "tokenizer.model").read_bytes()
    with safe_open(out, "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_tokenizer_in_file_round_trips(hf_folder, tmp_path):
    import sentencepiece

    sd = load_file(convert_gemma(hf_folder, tmp_path / "g.safetensors"))
    sp = sentencepiece.SentencePieceProcessor(model_proto=sd[SPIECE_KEY].numpy().tobytes(), add_bos=True)
    assert sp.encode("a red cat")[0] == 2 and sp.pad_id() == 0


def test_single_file_folder_and_fp32(hf_folder, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    save_file(_hf_tensors(hf_folder), single / "model.safetensors")
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, single / name)
    sd = load_file(convert_gemma(single, tmp_path / "g32.safetensors", dtype=torch.float32))
    assert sd["model.norm.weight"].dtype == torch.float32


def test_cli_subcommand(hf_folder, tmp_path):
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run([sys.executable, "-m", "jodi_core", "convert-gemma", str(hf_folder), str(out)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert SPIECE_KEY in load_file(out)


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def test_missing_tokenizer_is_a_clear_error(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "no_tok")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        convert_gemma(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_shard_is_a_clear_error(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "no_shard")
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        convert_gemma(folder, tmp_path / "x.safetensors")


def test_rejects_gemma3_and_other_models(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path / "g3")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    sd = load_file(shard)
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(32)
    save_file(sd, shard)
    with pytest.raises(CheckpointError, match="Gemma-3"):
        convert_gemma(folder, tmp_path / "x.safetensors")

    other = tmp_path / "other"
    other.mkdir()
    save_file({"encoder.weight": torch.zeros(2, 2)}, other / "model.safetensors")
    shutil.copy(hf_folder / "tokenizer.model", other / "tokenizer.model")
    with pytest.raises(CheckpointError, match="Gemma-2"):
        convert_gemma(other, tmp_path / "y.safetensors")


def test_bad_arguments(hf_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_gemma(tmp_path / "nope", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        convert_gemma(hf_folder, tmp_path / "x.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no Hugging Face weights"):
        convert_gemma(empty, tmp_path / "x.safetensors")


def test_base_model_warning(hf_folder, tmp_path, caplog):
    folder = _copy(hf_folder, tmp_path / "base")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="jodi_core.gemma"):
        convert_gemma(folder, tmp_path / "x.safetensors")
    assert "gemma-2-2b-it" in caplog.text
