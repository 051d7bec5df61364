"""Where and how the networks run: precision (fp32 default, 16-bit autocast), memory-bounded batch sizes and
channels-last convolutions (same numbers, another layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from retalk_server import JobSpec, ServerConfig
from torch import nn

from retalk import selftest
from retalk.device import CPU_BATCH_MB, autocast, batch_size, channels_last, check_precision
from retalk.engines import neural_steps as steps
from retalk.engines.neural import NeuralEngine
from retalk.errors import InputError
from retalk.pipeline import RedubRequest

CPU = torch.device("cpu")


def test_fp16_on_a_cpu_and_unknown_precisions_are_refused_in_one_line():
    with pytest.raises(InputError, match="fp16 needs a CUDA device; on the CPU use bf16 or fp32"):
        check_precision(CPU, "fp16")
    with pytest.raises(InputError, match="expected one of fp32, bf16, fp16"):
        autocast(CPU, "int8")


def test_bf16_autocast_runs_convolutions_in_bf16_and_fp32_leaves_them_alone():
    conv, x = nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8)
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16


def test_cpu_batches_stay_within_the_activation_budget():
    assert batch_size(CPU, 540) == 1  # a 512 px network: one face at a time
    assert batch_size(CPU, 30) == CPU_BATCH_MB // 30
    assert batch_size(CPU, 0.001) == 16  # capped
    for item_mb in (1, 7, 100, 255, 256, 1000):
        size = batch_size(CPU, item_mb)
        assert size >= 1 and (size == 1 or size * item_mb <= CPU_BATCH_MB)


def test_channels_last_keeps_the_numbers_and_changes_the_layout():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1)).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = model(x)
    channels_last(model)
    after = model(x)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert after.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_the_neural_engine_refuses_fp16_on_a_cpu_before_any_work(tmp_path):
    request = RedubRequest(video=tmp_path / "v.mp4", audio=tmp_path / "a.wav", output=tmp_path / "o.mp4")
    request.precision, request.device = "fp16", "cpu"
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        NeuralEngine(request)


def test_stages_under_bf16_return_fp32_numpy(tmp_path):
    """16-bit network outputs leave the stages as ordinary float32/uint8 arrays."""
    conv = nn.Conv2d(3, 257, 224).eval()  # a stand-in face3d: 224 crop -> 257 coefficients
    crops = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    lm = np.random.default_rng(1).uniform(60, 200, (2, 68, 2))
    lm[:, 36:48] = [[100, 100]] * 6 + [[160, 100]] * 6  # eyes apart, so the alignment is well posed
    with torch.inference_mode(), autocast(CPU, "bf16"):
        rows = steps.face3d_rows(lambda x: conv(x).flatten(1), crops, lm, CPU)
    assert rows.dtype == np.float32 and rows.shape == (2, 262) and np.isfinite(rows).all()


@pytest.mark.golden
def test_selftest_under_bf16_differs_from_fp32_but_stays_within_the_relaxed_rule(golden_dir, tmp_path):
    """The 16-bit path really runs in 16 bits (errors far above fp32's) and stays within its own rule."""
    (tmp_path / "golden").mkdir()
    (tmp_path / "golden" / "face3d_recon.npz").symlink_to(golden_dir / "face3d_recon.npz")
    rows = selftest.run_selftest(tmp_path / "golden", tmp_path / "checkpoints", "cpu", "bf16")
    assert rows and all(r.passed for r in rows), selftest.format_table(rows)
    assert all(selftest.REL_L2 < r.rel_l2 <= selftest.REDUCED_PRECISION_REL_L2["bf16"] for r in rows)


def test_server_workers_carry_the_servers_precision_into_each_request(tmp_path):
    """The precision is the server's (like its device): refused up front where the device cannot run it,
    then stamped on every job's request."""
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        ServerConfig(device="cpu", precision="fp16", state_dir=tmp_path).check()
    spec = JobSpec(Path("v.mp4"), Path("a.wav"), Path("o.mp4"), end=4, engine="neural")
    request = spec.on("cpu", "bf16").request()  # what a worker does with each job it takes
    assert (request.device, request.precision) == ("cpu", "bf16")
