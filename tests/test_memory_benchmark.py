"""Smoke test of benchmarks/memory.py: its --quick path runs on the CPU (tiny models measured in a child process)
and the numbers it computes from the real shapes hang together, so the script cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import REPO_ROOT

GiB = 2**30


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("memory_benchmark", REPO_ROOT / "benchmarks" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _rows(report, start: str, dtype: str | None = None) -> list[dict]:
    return [r for r in report["rows"] if r["what"].startswith(start) and (dtype is None or r["dtype"] == dtype)]


def _one(report, start: str, dtype: str) -> dict:
    rows = _rows(report, start, dtype)
    assert len(rows) == 1, (start, dtype, rows)
    return rows[0]


def test_every_measurement_ran(report):
    cases = report["cases"]
    assert {(c["kind"], c["op"]) for c in cases} == {
        ("dit", "weights"), ("dcae", "weights"), ("janus", "weights"),
        ("dit", "dit_step"), ("dcae", "dcae_decode"), ("janus", "janus_decode")}
    for c in cases:
        res = c["result"]
        if c["op"] == "weights":
            assert res["tensor_bytes"] > 0 and res["peak"] >= 0
        else:
            assert res["finite"] and res["activations"] >= 0, c
    measured = [r for r in report["rows"] if r["measured_gib"] is not None]
    assert len(measured) == len(cases) - 2  # Janus' two depths give one extrapolated row per dtype


def test_fp8_weights_are_about_half_of_bf16(report):
    for name in ("DiT weights", "DC-AE weights (f32c32", "Janus-Pro-7B weights"):
        bf16, fp8 = (_one(report, name, d)["computed_gib"] for d in ("bf16", "fp8"))
        # norms, biases, embeddings and the kept first/last layers stay 16-bit
        assert 0.5 <= fp8 / bf16 < 0.56, (name, bf16, fp8)
    assert 2.9 < _one(report, "DiT weights", "bf16")["computed_gib"] < 3.2  # 1.6 B parameters
    assert 13.0 < _one(report, "Janus-Pro-7B weights", "bf16")["computed_gib"] < 14.5  # 7.4 B parameters
    # the fp8 cast of Janus' language model is its text head, 102400 x 4096: one bf16 copy, scaled in place
    assert math.isclose(_one(report, "fp8 cast: largest fp8 weight of the Janus", "fp8")["computed_gib"],
                        102400 * 4096 * 2 / GiB, rel_tol=1e-3)


def test_estimates_grow_with_size_and_shrink_with_tiles(report):
    for dtype in ("fp32", "fp8/fp32"):
        small, large = sorted(_rows(report, "DiT step activations", dtype), key=lambda r: int(r["what"].split()[3]))
        assert small["computed_gib"] < large["computed_gib"]
    for dtype in ("bf16", "fp8"):
        step = _one(report, "DiT step activations 1024 px", dtype)["computed_gib"]
        assert step > max(r["computed_gib"] for r in _rows(report, "DiT step activations", "fp32"))
        whole, t512, t256 = (_one(report, f"DC-AE decode activations 1024 px, 8 maps, {t}", dtype)["computed_gib"]
                             for t in ("whole", "tiles 512", "tiles 256"))
        assert whole > t512 > t256 > 0
        kv = _one(report, "Janus-Pro-7B decode activations", dtype)["computed_gib"]
        cache = 2 * 30 * (640 + 512) * 4096 * 2  # K and V, 30 layers, bf16
        cast = 102400 * 4096 * 2 if dtype == "fp8" else 0  # the fp8 text head's bf16 copy
        assert math.isclose(kv, (cache + cast) / GiB, rel_tol=1e-3)
    # Every fp8 estimate holds its model's cast copy: more than bf16's by at least the "fp8 cast" row.
    for what, cast in (("DiT step activations 1024 px", "Jodi DiT,"),
                       ("DC-AE decode activations 1024 px, 8 maps, whole", "DC-AE decoder")):
        gap = _one(report, what, "fp8")["computed_gib"] - _one(report, what, "bf16")["computed_gib"]
        copy = _one(report, f"fp8 cast: largest fp8 weight of the {cast}", "fp8")["computed_gib"]
        assert 0 < copy - 1e-3 <= gap, (what, gap, copy)

def test_goals_are_checked(report):
    goals = {g["what"]: g for g in report["goals"]}
    assert len(goals) == 8
    for g in goals.values():
        assert g["peak_gib"] > 0 and g["ok"] in (True, False, None)
    fp8 = goals["Jodi 1024 px, 8 domains, CFG, fp8, DiT + DC-AE resident (computed)"]
    bf16 = goals["Jodi 1024 px, 8 domains, CFG, bf16, DiT + DC-AE resident (computed)"]
    assert fp8["peak_gib"] < bf16["peak_gib"]
    assert goals["Janus-Pro-7B, fp8, 640 + 512 tokens (computed)"]["limit_gib"] == 12
    assert goals["Janus-Pro-7B, bf16, 640 + 512 tokens (computed)"]["ok"] is None  # a reference, not a goal
