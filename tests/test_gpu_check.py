"""scripts/gpu_check.sh's logic that needs no GPU: versions, steps, report, profile/sync summaries."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmmt.tools import gpu_check, gpu_profile

ROOT = Path(__file__).resolve().parents[1]


def test_no_cuda_one_line_and_exit_0(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [gpu_check.NO_CUDA]
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout + proc.stderr
    assert "nothing to check" in proc.stdout


def test_versions_capture_what_is_installed():
    import faiss
    import triton
    from nvidia import dali

    info = gpu_check.versions()
    assert info["torch"] == torch.__version__ and info["torch CUDA"] == str(torch.version.cuda)
    assert info["triton"] == triton.__version__ and info["DALI"] == dali.__version__
    assert info["FAISS"] == faiss.__version__ and info["FAISS GPUs"] == str(faiss.get_num_gpus())
    assert info["python"] == sys.version.split()[0]
    if not torch.cuda.is_available():
        assert info["GPU"] == "none visible to torch"
    assert gpu_check._module_version("no_such_module_xyz").startswith("not importable (ModuleNotFoundError")


def test_run_step_outcomes(tmp_path):
    ok = gpu_check.run_step("echo", [sys.executable, "-c", "print('hello')"], log_dir=tmp_path)
    assert ok.ok is True and ok.detail == "hello" and "hello" in (tmp_path / "echo.log").read_text()
    bad = gpu_check.run_step("fails", [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert bad.ok is False
    missing = gpu_check.run_step("sanitizer", ["no-such-tool-xyz", "--x"])
    assert missing.ok is None and "not found" in missing.detail


def _cpu_profile_rows():
    a = torch.randn(64, 64)
    ts, ss = [torch.zeros(10) for _ in range(3)], [torch.ones(10) for _ in range(3)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a
        torch._foreach_lerp_(ts, ss, 0.5)
    return gpu_profile.profile_rows(prof)


def test_profile_summary_on_a_cpu_profile():
    rows = _cpu_profile_rows()
    by_name = {r["name"]: r for r in rows}
    assert by_name["aten::mm"]["calls"] == 3 and by_name["aten::mm"]["self_cpu_us"] > 0
    s = gpu_profile.summarize_profile(rows, top=5)
    assert s["ranked_by"] == "self_cpu_us" and len(s["top"]) == 5
    assert [r["self_cpu_us"] for r in s["top"]] == sorted((r["self_cpu_us"] for r in s["top"]), reverse=True)
    assert s["ema_backend_seen"] == "foreach" and s["loss_backend"] == "not seen (torch ops)"
    # kernel names a CUDA profile would hold
    gpu_rows = rows + [{"name": "_triplet_fwd", "calls": 2, "self_cpu_us": 0.0, "self_device_us": 50.0},
                       {"name": "_logits_bwd", "calls": 2, "self_cpu_us": 0.0, "self_device_us": 20.0},
                       {"name": "void (anonymous namespace)::ema_kernel<float>(TensorListMeta, float, float)",
                        "calls": 1, "self_cpu_us": 0.0, "self_device_us": 5.0}]
    g = gpu_profile.summarize_profile(gpu_rows)
    assert g["ranked_by"] == "self_device_us" and g["top"][0]["name"] == "_triplet_fwd"
    assert g["loss_backend"] == "triton" and g["loss_kernels"] == ["_logits_bwd", "_triplet_fwd"]
    assert g["ema_backend_seen"] == "ext (fastmmt._C CUDA kernel)"


def test_sync_summary():
    msgs = [("called a synchronizing CUDA operation", "mmt.py:240")] * 6 + \
           [("called a synchronizing CUDA operation", "kmeans.py:90")] * 2 + [("something else", "x.py:1")]
    s = gpu_profile.summarize_syncs(msgs, steps=4)
    assert s == {"total": 8, "steps": 4, "per_step": 2.0, "where": [("mmt.py:240", 6), ("kmeans.py:90", 2)]}


def test_benchmark_summary():
    data = {"benchmarks": [{"fullname": "bench/bench_ema.py::test_ema[ext]", "stats": {"median": 0.002},
                            "extra_info": {"ratio_to_loop": 3.5, "launches": 1}}]}
    assert gpu_check.summarize_benchmarks(data) == [
        {"name": "bench/bench_ema.py::test_ema[ext]", "median_s": 0.002, "ratios": {"ratio_to_loop": 3.5}}]


def test_report_written_with_every_section(tmp_path):
    steps = [gpu_check.Step("build extension", True, 12.3, "TORCH_CUDA_ARCH_LIST=8.6; has_cuda() -> True"),
             gpu_check.Step("test suite", False, 100.0, "1 failed, 300 passed", {"command": "python -m pytest tests"}),
             gpu_check.Step("compute-sanitizer memcheck", None, 0.0, "`compute-sanitizer` not found")]
    profile = {"shape": {**gpu_profile.PAPER, "views": 2, "iters": 20, "device": "cuda"},
               "backends": {"data": "dali", "clustering": "faiss-gpu"},
               "profile": gpu_profile.summarize_profile(_cpu_profile_rows(), top=3),
               "syncs": gpu_profile.summarize_syncs([("synchronizing", "a.py:1")] * 10, steps=20),
               "seconds": {"extract": 1.5, "cluster": 0.25, "train": 9.0}}
    bench = [{"name": "b::t", "median_s": 0.001, "ratios": {"ratio": 2.0}}]
    text = gpu_check.write_report(tmp_path / "gpu_check" / "REPORT.md", {"GPU": "NVIDIA A10 (sm_86)", "torch": "2.13.0"},
                                  steps, profile, bench)
    assert (tmp_path / "gpu_check" / "REPORT.md").read_text() == text
    assert "| build extension | PASS | 12.3 |" in text and "| test suite | FAIL | 100.0 |" in text
    assert "| compute-sanitizer memcheck | NOT RUN | 0.0 |" in text
    assert "| GPU | NVIDIA A10 (sm_86) |" in text and "`python -m pytest tests`" in text
    assert "## Synthetic MMT run (resnet50, 256x128, batch 64, 2 views, 20 steps, cuda)" in text
    assert "| data | dali |" in text and "| clustering | faiss-gpu |" in text and "| EMA | foreach |" in text
    assert "Host syncs: 10 over 20 training steps (0.50 per step" in text and "| a.py:1 | 10 |" in text
    assert "| train | 9.00 |" in text and "| b::t | 1.000 |" in text


@pytest.mark.slow
def test_profiled_run_end_to_end_in_miniature(tmp_path):
    """The profiled MMT run's code path at a CPU-sized shape (the library calls the GPU run makes)."""
    s = gpu_profile.run(tmp_path, iters=2, shape=gpu_profile.SMOKE)
    assert json.loads((tmp_path / "profile.json").read_text())["syncs"]["steps"] == 2
    assert s["backends"]["clustering"] in ("faiss", "faiss-gpu") and s["seconds"]["train"] > 0 and s["seconds"]["pretrain_seconds"] > 0
    assert s["profile"]["top"] and s["profile"]["loss_backend"] in ("triton", "not seen (torch ops)")
