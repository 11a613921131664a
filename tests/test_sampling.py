"""Sampler maths: the official time grid, solver orders, Euler, interrupt, and exactness on a known flow."""

import json

import pytest
import torch
from safetensors.torch import load_file

from jodi_core.sampling import Interrupted, flow_timesteps, get_sampler, sample_dpmpp_2m, sample_euler


@pytest.fixture(scope="module")
def sampler_fixture(fixtures_dir):
    meta = json.loads((fixtures_dir / "sampler_tiny.json").read_text())
    return meta, load_file(fixtures_dir / "sampler_tiny.safetensors")


def test_time_grid_matches_official(sampler_fixture):
    meta, t = sampler_fixture
    for s in meta["settings"]:
        name, steps = s["name"], s["steps"]
        grid = flow_timesteps(steps, s["flow_shift"])
        torch.testing.assert_close(grid, t[f"{name}.t_grid"], atol=1e-6, rtol=0)
        torch.testing.assert_close(1000 * grid[:steps], t[f"{name}.t_model"], atol=1e-4, rtol=0)
        assert grid[-1] == 0 and abs(grid[0].item() - 0.99966639) < 1e-7


def _straight_flow(x0):
    """A velocity field whose exact solution is known: the flow of a single data point x0."""

    def velocity(x, t):
        noise = (x - (1 - t) * x0) / t
        return noise - x0

    return velocity


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m, sample_euler])
def test_samplers_recover_a_single_data_point(sampler):
    x0 = torch.randn(1, 8, 4, 2, 2)
    noise = torch.randn_like(x0)
    grid = flow_timesteps(6)
    x = (1 - grid[0]) * x0 + grid[0] * noise
    out = sampler(_straight_flow(x0), x, grid)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_dpmpp_last_step_returns_the_data_prediction():
    seen = []
    x = torch.randn(1, 8, 4, 2, 2)
    out = sample_dpmpp_2m(lambda x, t: torch.ones_like(x) * t, x, flow_timesteps(3), callback=lambda i, x0, xn, n: seen.append((i, x0, xn, n)))
    assert [s[0] for s in seen] == [0, 1, 2] and seen[-1][3] == 3
    torch.testing.assert_close(out, seen[-1][1], atol=0, rtol=0)


def test_interrupt_between_steps():
    calls = []
    with pytest.raises(Interrupted):
        sample_euler(lambda x, t: (calls.append(1), x)[1], torch.zeros(1, 2), flow_timesteps(5), should_stop=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_sampler_names_and_bad_arguments():
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m and get_sampler("euler") is sample_euler
    for unknown in ("ddim", "dpm++2m-flow"):  # the nodes' labels are theirs to translate
        with pytest.raises(ValueError, match="Unknown sampler"):
            get_sampler(unknown)
    with pytest.raises(ValueError, match="positive integer"):
        flow_timesteps(0)


def test_euler_takes_explicit_steps_on_a_curved_field():
    def velocity(x, t):  # depends on x and t, so a wrong update rule shows
        return torch.sin(3 * x) + t * x

    grid = flow_timesteps(5)
    x = torch.randn(2, 8, 4, 2, 2)
    seen = []
    out = sample_euler(velocity, x, grid, callback=lambda i, x0, xn, n: seen.append((x0, xn)))
    expected = x
    for i, (x0, xn) in enumerate(seen):
        v = velocity(expected, grid[i])
        torch.testing.assert_close(x0, expected - grid[i] * v, rtol=0, atol=1e-6)
        expected = expected + (grid[i + 1] - grid[i]) * v
        torch.testing.assert_close(xn, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
