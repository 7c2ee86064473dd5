"""bf16 decided by a timed probe, cached per machine (precision.py), and spec.fast_bf16 reading it."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt import precision
from softprompt.spec import fast_bf16  # imported before conftest's fixture replaces spec.fast_bf16 with a constant


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """A CPU-only machine whose cache lives in tmp_path; returns the dtypes the probe timed, in order."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    timed: list[torch.dtype] = []
    timings = {torch.float32: 0.0223, torch.bfloat16: 0.0056}  # the brief's Zen 4: 22.3 ms against 5.6 ms

    def fake_seconds(dtype: torch.dtype) -> float:
        timed.append(dtype)
        return timings[dtype]

    monkeypatch.setattr(precision, "matmul_seconds", fake_seconds)
    return timed


def test_probe_runs_once_and_its_answer_is_cached(cpu, tmp_path):
    assert precision.bf16_pays() is True
    assert cpu == [torch.float32, torch.bfloat16]
    stored = json.loads((tmp_path / "precision.json").read_text())
    assert stored == {precision.machine_key(): {"fp32_ms": 22.3, "bf16_ms": 5.6, "speedup": 3.98, "bf16": True}}
    assert precision.bf16_pays() is True
    assert precision.bf16_pays() is True
    assert len(cpu) == 2  # read back, not probed again


def test_another_cpu_or_thread_count_probes_again_and_keeps_both(cpu, monkeypatch, tmp_path):
    precision.bf16_pays()
    first = precision.machine_key()
    monkeypatch.setattr(precision, "cpu_name", lambda: "Another CPU")
    precision.bf16_pays()
    assert len(cpu) == 4
    assert set(json.loads((tmp_path / "precision.json").read_text())) == {first, precision.machine_key()}


@pytest.mark.parametrize("fp32_s, bf16_s, pays", [
    (0.0223, 0.0056, True),  # avx512_bf16 without AMX: 4x
    (0.0131, 0.0100, True),  # just over the threshold
    (0.0125, 0.0100, False),  # 1.25x: not worth bf16's rounding
    (0.0100, 0.0800, False),  # no bf16 instructions: emulated, slower
])
def test_decision_from_timings(monkeypatch, fp32_s, bf16_s, pays):
    monkeypatch.setattr(precision, "matmul_seconds", lambda dtype: fp32_s if dtype == torch.float32 else bf16_s)
    record = precision.probe()
    assert record["bf16"] is pays
    assert record["speedup"] == round(fp32_s / bf16_s, 2)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"speedup": 4.0}}', '{"KEY": "yes"}', ""])
def test_a_corrupt_cache_is_probed_again_and_rewritten(cpu, tmp_path, content):
    path = tmp_path / "precision.json"
    path.write_text(content.replace("KEY", precision.machine_key()))
    assert precision.bf16_pays() is True
    assert len(cpu) == 2
    assert json.loads(path.read_text())[precision.machine_key()]["bf16"] is True


def test_an_unwritable_cache_still_decides(cpu, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(blocker / "cache"))  # a folder under a file cannot be made
    assert precision.bf16_pays() is True


@pytest.mark.parametrize("supported", [True, False])
def test_cuda_asks_the_device_and_probes_nothing(monkeypatch, tmp_path, supported):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)

    def no_probe(dtype):
        raise AssertionError("a CUDA machine should not time the CPU")

    monkeypatch.setattr(precision, "matmul_seconds", no_probe)
    assert precision.bf16_pays() is supported
    assert not (tmp_path / "precision.json").exists()


@pytest.mark.parametrize("pays", [True, False])
def test_spec_fast_bf16_is_the_probe(monkeypatch, pays):
    monkeypatch.setattr(precision, "bf16_pays", lambda: pays)
    assert fast_bf16() is pays


def test_the_real_probe_is_short_and_consistent():
    fp32_s = precision.matmul_seconds(torch.float32)
    bf16_s = precision.matmul_seconds(torch.bfloat16)
    assert 0 < fp32_s < 0.2 and 0 < bf16_s < 0.2  # with its warm-up call, well under a second in all
