"""Reading the Joint-1.6M layout (on a copy of the shared 3-sample dataset)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLE_DATA_DIR
from jodi_core.data.joint_dataset import JointDataset, collate, load_image, read_metadata
from jodi_core.domains import DOMAIN_NAMES, DOMAINS, seg_palette


@pytest.fixture()
def data(tmp_path):
    if not (EXAMPLE_DATA_DIR / "metadata.jsonl").is_file():
        pytest.skip(f"example dataset not found at {EXAMPLE_DATA_DIR}")
    dst = tmp_path / "joint"
    shutil.copytree(EXAMPLE_DATA_DIR, dst)
    return dst


def test_items_have_all_available_labels(data):
    ds = JointDataset(data, size=64)
    assert len(ds) == 3
    records = read_metadata(data / "metadata.jsonl")
    for i in range(3):
        item = ds[i]
        assert item["pixels"].shape == (8, 3, 64, 64) and item["pixels"].dtype == torch.float32
        assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
        expected = [isinstance(records[i].get(d.metadata_key), str) for d in DOMAINS]
        assert item["available"].tolist() == expected
        # Missing labels are zeros; present ones are real images.
        for d in DOMAINS:
            if expected[d.index]:
                assert item["pixels"][d.index].std() > 0.01, d.name
            else:
                assert (item["pixels"][d.index] == 0).all(), d.name
        assert item["caption"] in records[i]["caption"].values()
        assert item["captions"] == records[i]["caption"]
    # The shared data: only one record has an openpose map.
    openpose = DOMAIN_NAMES.index("openpose")
    assert sum(bool(ds[i]["available"][openpose]) for i in range(3)) == 1


def test_geometry_is_cover_and_centre_crop(data):
    rec = read_metadata(data / "metadata.jsonl")[1]  # 1916 x 1024 landscape
    x = load_image(data / rec["image"], (64, 64))
    with Image.open(data / rec["image"]) as im:
        w, h = im.size
        side = min(w, h)
        left, top = round((w - side) / 2), round((h - side) / 2)
        ref = np.asarray(im.convert("RGB").crop((left, top, left + side, top + side)).resize((64, 64), Image.BILINEAR))
    ref = torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert (x - ref).abs().mean() < 0.05
    # Non-square sizes keep the aspect of the crop.
    y = load_image(data / rec["image"], (32, 64))
    assert y.shape == (3, 32, 64)


def test_segmentation_keeps_exact_palette_colours(data):
    ds = JointDataset(data, size=48)
    seg = ds[0]["pixels"][DOMAIN_NAMES.index("segmentation")]
    rgb = ((seg + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3)
    palette = seg_palette("colors12")
    assert (torch.cdist(rgb, palette).min(1).values < 0.5).all()


def test_depth_in_grayscale_files_becomes_three_channels(data):
    item = JointDataset(data, size=32)[0]
    depth = item["pixels"][DOMAIN_NAMES.index("depth")]
    torch.testing.assert_close(depth[0], depth[1])
    torch.testing.assert_close(depth[0], depth[2])


def test_domain_subset_and_captions(data):
    ds = JointDataset(data, size=32, domains=["depth", "seg"])
    item = ds[0]
    assert item["available"].tolist() == [True, False, False, True, False, False, True, False]
    weighted = JointDataset(data, size=32, caption_weights={"BLIP2-OPT-2.7b": 1.0})
    rec = read_metadata(data / "metadata.jsonl")[0]
    assert weighted[0]["caption"] == rec["caption"]["BLIP2-OPT-2.7b"]
    # Deterministic per (seed, epoch, index); the choice varies over epochs.
    a = [JointDataset(data, size=32).choose_caption(rec["caption"], 0) for _ in range(2)]
    assert a[0] == a[1]
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        seen.add(ds.choose_caption(rec["caption"], 0))
    assert seen == set(rec["caption"].values())


def test_collate_and_dataloader(data):
    loader = torch.utils.data.DataLoader(JointDataset(data, size=32), batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (3, 8, 3, 32, 32)
    assert batch["available"].shape == (3, 8) and len(batch["caption"]) == 3


def test_errors_name_the_problem(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        JointDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="size"):
        JointDataset(data, size=0)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text(lines[0] + "\n{broken\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: invalid JSON"):
        JointDataset(data)
    rec = json.loads(lines[0])
    rec["annotation_depth"] = "annotation_depth/missing.jpg"
    (data / "metadata.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        JointDataset(data, size=32)[0]
    (data / "metadata.jsonl").write_text(json.dumps({"caption": "no image"}) + "\n")
    with pytest.raises(ValueError, match="'image'"):
        JointDataset(data)
