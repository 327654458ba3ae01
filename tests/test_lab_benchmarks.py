"""The device check and the workloads benchmark run on the CPU (the device check picks the GPU where there is one, so
what a GPU machine runs is what CI runs here, at tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gradstep.lab import bench_muon, bench_workloads, cuda_check


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


def test_muon_benchmark_times_every_implementation_in_both_iterations(tmp_path: Path) -> None:
    out = tmp_path / "muon.json"
    argv = [
        "--size",
        "16",
        "--layers",
        "2",
        "--width",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--profile",
        "--no-screen",
    ]
    assert bench_muon.main([*argv, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [w["name"] for w in results["workloads"]] == ["reference", "transformer-48"]
    assert [w["matrices"] for w in results["workloads"]] == [24, 8]
    labels = {"torch.optim.Muon", "gradstep.Muon", "pytorch_optimizer.Muon"}
    for workload in results["workloads"]:
        rows = {(r["iteration"], r["implementation"]): r for r in workload["rows"]}
        assert set(rows) == {(i, label) for i in ("bfloat16", "float32") for label in labels}
        assert all(r["ms"] > 0 and 0 <= r["matmul_share"] <= 1 for r in rows.values())
        assert rows[("float32", "gradstep.Muon")]["x_gradstep"] == 1.0
    # The float32 patch of torch's iteration is undone after each step.
    assert bench_muon.torch_muon._zeropower_via_newtonschulz is not bench_muon.torch_newton_schulz_uncast
