"""The extension build recipe (csrc/build_ext_helper.py): which CUDA archs, when CUDA is skipped,
and that a failing CUDA configuration still leaves the CPU extension built (saying why once)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
try:
    import build_ext_helper as helper
finally:
    sys.path.remove(str(ROOT / "csrc"))


def test_cuda_skip_reason_names_the_disagreement():
    assert helper.cuda_skip_reason("12.8", "/cuda/bin/nvcc", "12.4") is None  # minor may differ
    assert helper.cuda_skip_reason(None, "/cuda/bin/nvcc", "13.0") == "torch is a CPU-only build"
    assert "nvcc not found" in helper.cuda_skip_reason("13.0", None, None)
    assert helper.cuda_skip_reason("12.8", "/cuda/bin/nvcc", "13.0") == (
        "torch was built with CUDA 12.8 but /cuda/bin/nvcc is CUDA 13.0 "
        "(install the toolkit matching torch, or point CUDA_HOME at it)")
    assert "cannot read" in helper.cuda_skip_reason("13.0", "/x/nvcc", None)


def test_nvcc_version_parsed(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    fake.chmod(0o755)
    assert helper.nvcc_version(str(fake)) == "12.4"
    assert helper.nvcc_version(str(tmp_path / "missing")) is None
    real = shutil.which("nvcc")
    if real:
        out = subprocess.run([real, "--version"], capture_output=True, text=True).stdout
        assert helper.nvcc_version(real) in out


def test_cuda_wanted_prints_one_line_when_skipping(monkeypatch, capsys):
    monkeypatch.delenv("FASTMMT_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(helper, "find_nvcc", lambda: "/opt/cuda-13/bin/nvcc")
    monkeypatch.setattr(helper, "nvcc_version", lambda nvcc: "13.0")
    assert helper.cuda_wanted() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[fastmmt._C] building the CPU path only, CUDA skipped: torch was built with CUDA "
                   "12.8 but /opt/cuda-13/bin/nvcc is CUDA 13.0 (install the toolkit matching torch, "
                   "or point CUDA_HOME at it)"]
    monkeypatch.setattr(helper, "nvcc_version", lambda nvcc: "12.6")
    assert helper.cuda_wanted() is True
    assert capsys.readouterr().err == ""


def test_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert helper.cuda_arch_list(gpu_visible=False) == "8.0;8.6;9.0+PTX"
    assert helper.cuda_arch_list(gpu_visible=True) is None  # torch compiles for the visible GPU
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert helper.cuda_arch_list(gpu_visible=False) == "8.9"
    assert helper.cuda_arch_list(gpu_visible=True) == "8.9"


def test_failing_cuda_check_still_builds_the_cpu_extension(monkeypatch, capsys):
    """BuildExtension refuses a torch/nvcc mismatch before building anything; SafeBuildExt then
    builds the CPU-only extension (it used to swallow the error and build no _C at all)."""
    from setuptools import Distribution, Extension
    from torch.utils.cpp_extension import BuildExtension

    ext = Extension(helper.NAME, helper.CPU_SOURCES + helper.CUDA_SOURCES, define_macros=[helper.CUDA_MACRO],
                    extra_compile_args={"cxx": list(helper.CXX_FLAGS), "nvcc": ["-O3"]})
    runs = []

    def fake_run(self):
        (e,) = self.extensions
        runs.append((list(e.sources), list(e.define_macros), dict(e.extra_compile_args)))
        if len(runs) == 1:
            raise RuntimeError("The detected CUDA version (13.0) mismatches the version that was used "
                               "to compile PyTorch (12.8). Please make sure to use the same CUDA versions.\n")

    monkeypatch.setattr(BuildExtension, "run", fake_run)
    cmd = helper._make_build_ext()(Distribution({"ext_modules": [ext]}))
    cmd.extensions = [ext]
    cmd.run()
    assert len(runs) == 2
    sources, macros, args = runs[1]
    assert sources == helper.CPU_SOURCES and helper.CUDA_MACRO not in macros and "nvcc" not in args
    assert capsys.readouterr().err.strip().splitlines() == [
        "[fastmmt._C] building the CPU path only, CUDA skipped: The detected CUDA version (13.0) "
        "mismatches the version that was used to compile PyTorch (12.8). Please make sure to use the "
        "same CUDA versions."]


def test_has_cuda_tells_what_was_built():
    from fastmmt.ops.ema import load_extension

    ext = load_extension()
    assert ext is not None, "fastmmt._C is not built"
    if torch.version.cuda is None:  # a CPU torch cannot have built the CUDA path
        assert ext.has_cuda() is False


@pytest.mark.slow
def test_forced_cuda_build_with_cpu_torch_falls_back_to_the_cpu_extension(tmp_path):
    """A real build (a minute or two): FASTMMT_CUDA=1 with this CPU torch (and nvcc's toolkit as
    CUDA_HOME) makes the CUDA build fail; the CPU extension is built anyway, saying why, and
    reports has_cuda() False."""
    if torch.version.cuda is not None or shutil.which("nvcc") is None:
        pytest.skip("needs a CPU-only torch and an nvcc to make the CUDA build fail")
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not Path(home, "bin", "nvcc").exists():
        pytest.skip(f"no CUDA toolkit at {home} (set CUDA_HOME)")
    env = {**os.environ, "FASTMMT_CUDA": "1", "MAX_JOBS": "1", "CUDA_HOME": home}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[fastmmt._C] building the CPU path only, CUDA" in proc.stderr, proc.stderr[-3000:]
    (so,) = (tmp_path / "lib" / "fastmmt").glob("_C*.so")
    code = ("import importlib.util, sys, torch; spec = importlib.util.spec_from_file_location('fastmmt._C', "
            f"{str(so)!r}); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.has_cuda())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr


def _fake_nvcc(home: Path) -> str:
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    return str(nvcc)


def test_nvcc_found_where_torch_finds_cuda(monkeypatch, tmp_path):
    """Neither CUDA_HOME nor PATH names it, but torch's extension build knows the CUDA home (e.g.
    a toolkit torch found by its own search): the helper builds with that nvcc, not CPU-only."""
    from torch.utils import cpp_extension

    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(helper, "DEFAULT_NVCC", str(tmp_path / "nowhere" / "nvcc"))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert helper.find_nvcc() is None
    nvcc = _fake_nvcc(tmp_path / "torch-cuda")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "torch-cuda"))
    assert helper.find_nvcc() == nvcc
    env_nvcc = _fake_nvcc(tmp_path / "env-cuda")  # an explicit CUDA_HOME still comes first
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "env-cuda"))
    assert helper.find_nvcc() == env_nvcc


def test_skipping_cuda_with_a_visible_gpu_is_a_warning(monkeypatch, capsys):
    monkeypatch.delenv("FASTMMT_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(helper, "find_nvcc", lambda: None)
    assert helper.cuda_wanted() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("WARNING [fastmmt._C]: a GPU is visible but the extension is "
                                               "built WITHOUT its CUDA kernel: nvcc not found")


def test_dali_build_follows_the_driver():
    assert helper.dali_requirement("580.159.04") == helper.DALI_CUDA13 == "nvidia-dali-cuda130>=2.0"
    assert helper.dali_requirement("575.51.03") == helper.DALI_CUDA12 == "nvidia-dali-cuda120>=2.0"
    assert helper.dali_requirement("535.104.05") == helper.DALI_CUDA12
    assert helper.dali_requirement(None) == helper.DALI_CUDA13  # no driver: CPU-only pipelines
