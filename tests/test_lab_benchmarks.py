"""The device check and the workloads benchmark run on the CPU (the device check picks the GPU where there is one, so
what a GPU machine runs is what CI runs here, at tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gradstep.lab import bench_workloads, cuda_check


def test_cuda_check_picks_the_cpu_without_a_gpu_and_every_path_is_within_its_float32_bound(tmp_path: Path) -> None:
    assert cuda_check.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    out = tmp_path / "check.json"
    assert cuda_check.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    checks = {(r["optimizer"], r["path"]): r for r in results["checks"]}
    # Every optimizer runs eager (compiled: AdamW alone, in the quick mode); torch's fused kernels serve Adam, AdamW
    # and SGD.
    assert checks[("adamw", "compiled")]["status"] == "ok"
    for name in cuda_check.CHECKED:
        assert checks[(name, "eager")]["status"] == "ok", checks[(name, "eager")]
        expected = "ok" if name in cuda_check.TORCH_FUSED else "not offered"
        assert checks[(name, "fused")]["status"] == expected, checks[(name, "fused")]
    assert all(
        0 < r["max_relative_difference"] <= r["bound"] for r in results["checks"] if "max_relative_difference" in r
    )
    screens = [r for r in results["checks"] if r["path"].startswith("screen")]
    assert len(screens) == 3 and all(r["status"] == "ok" for r in screens), screens
    assert {r["workload"] for r in results["timings"]} == {"reference", "transformer-48"}


def test_workloads_benchmark_times_every_row_against_torch_fused(tmp_path: Path) -> None:
    out = tmp_path / "workloads.json"
    argv = ["--only", "tiny-600", "--optimizers", "adamw", "--steps", "2", "--warmup", "0"]
    assert bench_workloads.main([*argv, "--compiled-max-tensors", "0", "--json", str(out)]) == 0
    (workload,) = json.loads(out.read_text())["workloads"]
    assert workload["tensors"] == 600
    labels = [r["implementation"] for r in workload["rows"]]
    assert labels[0] == "torch fused" and "gradstep default" in labels and "gradstep compiled" not in labels
    assert workload["rows"][0]["x_torch_fused"] == 1.0
    assert all(r["ms"] > 0 for r in workload["rows"])
