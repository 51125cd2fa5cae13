"""bench.step_ops counts what a GPU would launch: work ops once each, views and no-ops never, the C kernel once."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.step_ops import KERNEL_SCOPE, SEQUENCES, count_launches, count_ops, scattered_slots


def _profile(fn) -> list:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return prof.events()


def test_work_ops_count_once_views_and_no_ops_never() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)

    def step() -> None:
        x = a.view(2, 16).reshape(4, 8).t().contiguous()  # one copy (the contiguous of a transpose)
        y = a.to(torch.float32) @ b  # `to` returns a itself: no op; the matmul is one
        (y + 1).unsqueeze(0)  # one add
        with torch.profiler.record_function(KERNEL_SCOPE):  # the C kernel: one, whatever runs inside
            x.sum()
            x.sum()

    counts = count_ops(_profile(step))
    assert counts[KERNEL_SCOPE] == 1
    assert "aten::sum" not in counts
    assert counts.total() == 4, counts


def test_converting_to_counts_through_its_copy() -> None:
    a = torch.randn(4, 8)
    counts = count_ops(_profile(lambda: a.to(torch.float64)))
    assert counts.total() == 1 and counts["aten::copy_"] == 1, counts


def test_adapters_are_scattered_and_sixteen() -> None:
    slots = scattered_slots()
    assert len(slots) == SEQUENCES and len(set(slots)) == 16
    assert not any(b - a == 1 for a, b in zip(sorted(set(slots)), sorted(set(slots))[1:]))


def test_cuda_launches_are_the_runtime_launch_calls() -> None:
    names = ["cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "aten::mm",
             "cudaLaunchKernelExC"]
    assert count_launches([SimpleNamespace(name=n) for n in names]) == 4


def test_report_rows_hold_the_served_path_to_the_target(monkeypatch) -> None:
    from bench import step_ops
    monkeypatch.setattr(step_ops, "measure", lambda top, device, dtype: [
        step_ops.OpsRow("CPU default (C kernel)", 1164, 1374, 210),
        step_ops.OpsRow("TorchBackend", 1164, 8724, 210, 900, 9000)])
    rows, data = step_ops.report_rows("cpu", "float32")
    assert [r.verdict for r in rows] == ["PASS", ""]  # the target is the served path's; torch's is reference
    assert rows[0].value == 1.0 and rows[0].cells()[2] == "1.0 ops" and rows[0].cells()[3] == "<= 2.0 ops"
    assert "900 / 9000 CUDA launches" in rows[1].info and data[1]["adapted"] == 8724
