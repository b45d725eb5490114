"""scripts/gpu_check.sh's logic that needs no GPU: versions, steps, report, profile/sync summaries."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmmt.tools import gpu_check, gpu_profile

ROOT = Path(__file__).resolve().parents[1]


def _fake_smi(folder: Path) -> str:
    """A PATH whose ``nvidia-smi`` lists one H100 (the rest of PATH kept)."""
    from test_device_selection import fake_nvidia_smi

    return f"{fake_nvidia_smi(folder)}:{os.environ['PATH']}"


def test_no_gpu_listed_one_line_and_exit_0(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    monkeypatch.setenv("PATH", str(tmp_path / "empty") + ":" + os.environ["PATH"].replace("nvidia", "_"))
    monkeypatch.setattr(gpu_check, "listed_nvidia_gpus", lambda: [])
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [gpu_check.NO_CUDA]
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout + proc.stderr
    assert "nothing to check" in proc.stdout


@pytest.mark.parametrize("mode", ["venv", "system"])
def test_dry_run_listed_gpu_that_torch_cannot_use_fails(tmp_path, mode):
    """The exact path a CUDA user runs, with the GPU listed by a fake ``nvidia-smi`` but this
    machine's torch a CPU build (venv) or no torch at all (``--system``: python3 here has none):
    the check must fail, naming the GPU and the reason, and write that in the report."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    env = {**os.environ, "PATH": _fake_smi(tmp_path / "bin")}
    if mode == "venv":  # the venv this test runs in, set up by scripts/dev.sh (else dev.sh would make one)
        venv = Path(sys.executable).parent.parent
        if not (venv / ".fastmmt-setup").is_file():
            pytest.skip(f"{venv} was not set up by scripts/dev.sh")
        env["FASTMMT_VENV"] = str(venv)
    args = ["bash", "scripts/gpu_check.sh", "--quick", "--out", str(tmp_path / "out")]
    if mode == "system":  # the machine's python3, as on a GPU box without a registry
        args.insert(2, "--system")
        env.pop("FASTMMT_PYTHON", None)
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL: nvidia-smi lists 1 GPU(s) (GPU 0: NVIDIA H100 80GB HBM3" in proc.stdout
    assert "**FAIL: nvidia-smi lists 1 GPU(s)" in text and "Nothing on the GPU was checked" in text
    assert "| CUDA torch | FAIL |" in text
    if mode == "venv":
        assert "is a CPU-only build; install a CUDA build of torch" in text
        assert "bash scripts/gpu_check.sh --system" in text
    else:
        assert "set FASTMMT_PYTHON" in text


def test_versions_capture_what_is_installed():
    import faiss
    import triton

    info = gpu_check.versions()
    assert info["torch"] == torch.__version__ and info["torch CUDA"] == str(torch.version.cuda)
    assert info["triton"] == triton.__version__
    try:
        from nvidia import dali
    except ImportError:
        assert info["DALI"].startswith("not importable")
    else:
        assert info["DALI"] == dali.__version__
    assert info["FAISS"] == faiss.__version__ and info["FAISS GPUs"] == str(faiss.get_num_gpus())
    assert info["python"] == f"{sys.version.split()[0]} ({sys.executable})"
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


def _profile_summary(stop_syncs: int = 0, data: str = "dali", clustering: str = "faiss-gpu") -> dict:
    where = [("called a synchronizing CUDA operation", "mmt.py:120")] * stop_syncs
    return {"shape": {**gpu_profile.PAPER, "views": 2, "iters": 20, "device": "cuda"},
            "backends": {"data": data, "clustering": clustering, "EMA (stop)": "ext", "EMA (skip)": "foreach"},
            "profile": gpu_profile.summarize_profile(_cpu_profile_rows(), top=3),
            "step_syncs": {"stop": gpu_profile.summarize_syncs(where, steps=20),
                           "skip": gpu_profile.summarize_syncs([], steps=20)},
            "seconds": {"extract": 1.5, "cluster": 0.25, "train": 9.0}}


INFO = {"GPU": "NVIDIA H100 (sm_90)", "torch": "2.11.0", "DALI": "2.4.0", "FAISS": "1.15.1", "FAISS GPUs": "1"}


def test_report_written_with_every_section(tmp_path):
    steps = [gpu_check.Step("build extension", True, 12.3, "TORCH_CUDA_ARCH_LIST=9.0; has_cuda() -> True"),
             gpu_check.Step("test suite", False, 100.0, "1 failed, 300 passed", {"command": "python -m pytest tests"}),
             gpu_check.Step("compute-sanitizer memcheck", None, 0.0, "`compute-sanitizer` not found")]
    profile = _profile_summary(stop_syncs=10)
    part_list = gpu_check.parts({s.name: s for s in steps}, profile, INFO)
    bench = [{"name": "b::t", "median_s": 0.001, "ratios": {"ratio": 2.0}}]
    text = gpu_check.write_report(tmp_path / "gpu_check" / "REPORT.md", INFO, steps, profile, bench, part_list,
                                  "FAIL: test suite")
    assert (tmp_path / "gpu_check" / "REPORT.md").read_text() == text
    assert "**FAIL: test suite**" in text
    assert "| build extension | PASS | 12.3 |" in text and "| test suite | FAIL | 100.0 |" in text
    assert "| compute-sanitizer memcheck | NOT RUN | 0.0 |" in text
    assert "| GPU | NVIDIA H100 (sm_90) |" in text and "`python -m pytest tests`" in text
    assert "## Synthetic MMT run (resnet50, 256x128, batch 64, 2 views, 20 steps per policy, cuda)" in text
    assert "| data | dali |" in text and "| clustering | faiss-gpu |" in text and "| EMA (stop) | ext |" in text
    assert "run.on_nonfinite=stop: 10 over 20 steps (0.50 per step)" in text and "| mmt.py:120 | 10 |" in text
    assert "| Triton kernels under compute-sanitizer | NOT INSTALLED HERE |" in text
    assert "| training step without host syncs (run.on_nonfinite=stop) | FAIL | 10 syncs over 20 steps; first " \
           "at mmt.py:120 |" in text
    assert "| training step without host syncs (run.on_nonfinite=skip) | PASS |" in text
    assert "| train | 9.00 |" in text and "| b::t | 1.000 |" in text


def test_parts_say_what_ran_and_what_is_not_installed():
    ok_build = gpu_check.Step("build extension", True, extra={"has_cuda": True})
    no_kernel = gpu_check.Step("build extension", False, extra={"has_cuda": False})
    by = {p.name: p for p in gpu_check.parts({"build extension": ok_build}, _profile_summary(), INFO)}
    assert by["EMA extension, CUDA kernel"].status == "PASS" and by["DALI GPU pipelines"].status == "PASS"
    assert by["FAISS on the GPU"].status == "PASS"
    assert all(p.status == "PASS" for p in by.values())
    by = {p.name: p for p in gpu_check.parts({"build extension": no_kernel}, _profile_summary(data="torch"), INFO)}
    assert by["EMA extension, CUDA kernel"].status == "FAIL"
    assert by["DALI GPU pipelines"].status == "FAIL"  # DALI installed, but the torch loader ran
    bare = {**INFO, "DALI": "not importable (ModuleNotFoundError: nvidia)", "FAISS GPUs": "0"}
    by = {p.name: p for p in gpu_check.parts({}, _profile_summary(data="torch", clustering="faiss"), bare)}
    assert by["DALI GPU pipelines"].status == "NOT INSTALLED HERE"
    assert by["FAISS on the GPU"].status == "NOT INSTALLED HERE" and "clustering ran on faiss" in by["FAISS on the GPU"].detail
    by = {p.name: p for p in gpu_check.parts({}, None, INFO)}
    assert by["training step without host syncs"].status == "FAIL"


def test_sanitizer_runs_without_the_caching_allocator(monkeypatch):
    seen = {}
    monkeypatch.setattr(gpu_check, "run_step", lambda name, cmd, env=None, **kw: seen.update(cmd=cmd, env=env))
    gpu_check.sanitizer_step(None)
    assert seen["env"] == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    assert seen["cmd"][0].endswith("compute-sanitizer")
    assert seen["cmd"][1:5] == ["--tool", "memcheck", "--error-exitcode", "1"]
    assert "fastmmt.tools.kernel_sweep" in seen["cmd"]


def test_step_time_out_kills_the_whole_tree(tmp_path):
    """A step past its time is killed with its children (xdist workers): the check goes on."""
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('started', flush=True); time.sleep(60)"
    t0 = time.perf_counter()
    step = gpu_check.run_step("slow", [sys.executable, "-c", script], timeout=2, log_dir=tmp_path)
    assert time.perf_counter() - t0 < 20 and step.ok is False
    assert "started" in step.detail and "timed out after 2 s (step killed)" in step.detail


def test_suite_command_and_junit_counts(tmp_path):
    cmd = gpu_check.suite_command(tmp_path, quick=True, jobs=1)
    assert cmd[cmd.index("-m", 2) + 1] == "not slow" and "-n" not in cmd
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped message="dali: NVIDIA DALI is not installed here"/></testcase>'
        '<testcase name="d"><skipped message="dali: NVIDIA DALI is not installed here"/></testcase>'
        '<testcase name="e"><error message="boom"/></testcase></testsuite></testsuites>')
    assert gpu_check.junit_counts(tmp_path / "t.xml") == {"passed": 1, "failed": 2, "skipped": 2,
                                                           "skip_reasons": {"dali": 2}}


def test_step_sync_counting_sees_only_the_step(monkeypatch):
    """The profile's counter records sync warnings raised inside the trainer's step and nothing
    raised around it (extraction, clustering); the original step is restored afterwards."""
    import warnings

    from fastmmt.train import mmt

    class FakeAdapt:
        loader, sc = object(), type("Ctx", (), {"info": {"ema_backend": "ext"}})()

    def fake_step(self, *a, **k):
        warnings.warn("called a synchronizing CUDA operation")
        return {"loss": 1}

    monkeypatch.setattr(mmt._Adapt, "step", fake_step)
    with gpu_profile.step_sync_debug(cuda=False) as (messages, seen):
        with pytest.warns(UserWarning):  # outside a step: not counted
            warnings.warn("called a synchronizing CUDA operation")
        assert mmt._Adapt.step(FakeAdapt()) == {"loss": 1}
        mmt._Adapt.step(FakeAdapt())
    assert mmt._Adapt.step is fake_step
    s = gpu_profile.summarize_syncs(messages, seen["steps"])
    assert s["total"] == 2 and s["steps"] == 2 and seen == {"steps": 2, "loader": "object", "ema_backend": "ext"}


@pytest.mark.slow
def test_profiled_run_end_to_end_in_miniature(tmp_path):
    """The profiled MMT run's code path at a CPU-sized shape (the library calls the GPU run makes)."""
    s = gpu_profile.run(tmp_path, iters=2, shape=gpu_profile.SMOKE)
    assert json.loads((tmp_path / "profile.json").read_text())["step_syncs"]["stop"]["steps"] == 2
    assert s["step_syncs"]["skip"]["steps"] == 2 and s["backends"]["data"] in ("dali", "torch")
    assert s["backends"]["clustering"] in ("faiss", "faiss-gpu") and s["seconds"]["train"] > 0
    assert s["seconds"]["pretrain_seconds"] > 0 and s["backends"]["EMA (skip)"] == "foreach"
    assert s["profile"]["top"] and s["profile"]["loss_backend"] in ("triton", "not seen (torch ops)")


def test_dev_sh_keeps_python3s_cuda_torch(tmp_path):
    """``scripts/dev.sh`` links python3's torch into .venv when it is a CUDA build (instead of
    installing the CPU wheel over it) and links nothing for a CPU build or no torch."""
    def site_for(cuda: str | None) -> str:
        site = tmp_path / str(cuda) / "site"
        (site / "torch").mkdir(parents=True)
        (site / "torch" / "__init__.py").write_text(f"__version__ = '2.11.0'\nclass version:\n    cuda = {cuda!r}\n")
        env = {**os.environ, "PYTHONPATH": str(site)}
        out = subprocess.run(["bash", "scripts/dev.sh", "system-torch"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert site_for("13.0") == str(tmp_path / "13.0" / "site")
    assert site_for(None) == ""
