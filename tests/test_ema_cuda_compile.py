"""The CUDA path of fastmmt._C cannot run here (no GPU): show that it compiles.

- csrc/ema_kernel.cu with nvcc for sm_80 and sm_90, warnings as errors (about 4 s each);
- the CUDA binding csrc/ema_cuda_binding.cpp and ema.cpp's CUDA branch against torch's headers
  (syntax-only, about 12 s each). The CPU torch wheel lacks the generated
  ``c10/cuda/impl/cuda_cmake_macros.h``; ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` (torch's own switch)
  skips it. Linking against a CUDA torch is not possible with the CPU wheel.
Skipped only when nvcc (or a host C++ compiler) is absent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++"))


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def _cuda_include() -> str:
    """The toolkit's include dir: $CUDA_HOME, beside nvcc, or /usr/local/cuda."""
    homes = [os.environ.get("CUDA_HOME", ""), str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime.h").exists():
            return str(Path(home) / "include")
    pytest.fail(f"cuda_runtime.h not found under any of {homes} (set CUDA_HOME)")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernel_compiles_with_nvcc(arch, tmp_path):
    obj = tmp_path / f"ema_sm{arch}.o"
    _run([NVCC, "-c", str(CSRC / "ema_kernel.cu"), "-o", str(obj), "-O3", "-std=c++17",
          "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings"])
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "--defined-only", str(obj)], capture_output=True, text=True).stdout
        assert " T fastmmt_ema_cuda_launch" in symbols and " T fastmmt_ema_cuda_error_string" in symbols
        assert " T fastmmt_cuda_take_pending_error" in symbols


def test_kernel_source_has_no_torch_headers():
    """The .cu must build with nvcc alone (a CPU torch cannot drive torch's CUDAExtension)."""
    for name in ("ema_kernel.cu", "ema_cuda.h"):
        text = (CSRC / name).read_text()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, name


@pytest.mark.skipif(NVCC is None or CXX is None, reason="nvcc or a C++ compiler missing")
def test_cuda_binding_compiles_against_torch_headers():
    """Both torch-side sources with FASTMMT_WITH_CUDA, compiled concurrently (about 12 s each)."""
    flags = ["-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-fopenmp",
             "-DFASTMMT_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C"]
    includes = [f"-I{p}" for p in include_paths() + [_cuda_include(), sysconfig.get_paths()["include"]]]
    cmds = [[CXX, *flags, *includes, str(CSRC / src)] for src in ("ema_cuda_binding.cpp", "ema.cpp")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{out}\n{err}"


def test_build_switch(monkeypatch):
    """FASTMMT_CUDA=0/1 forces the CUDA path off/on; anything else is a clear error; unset follows
    torch (this CPU torch: off)."""
    sys.path.insert(0, str(CSRC))
    try:
        import build_ext_helper as helper
    finally:
        sys.path.remove(str(CSRC))
    import torch

    monkeypatch.setenv("FASTMMT_CUDA", "0")
    assert helper.cuda_wanted() is False
    monkeypatch.setenv("FASTMMT_CUDA", "1")
    assert helper.cuda_wanted() is True
    monkeypatch.setenv("FASTMMT_CUDA", "yes")
    with pytest.raises(ValueError, match="FASTMMT_CUDA must be 0, 1 or unset, got 'yes'"):
        helper.cuda_wanted()
    monkeypatch.delenv("FASTMMT_CUDA")
    expected = torch.version.cuda is not None and NVCC is not None
    assert helper.cuda_wanted() is expected
    kwargs = helper.extension_kwargs()
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "fastmmt._C" and "csrc/ema.cpp" in ext.sources
    assert ("csrc/ema_kernel.cu" in ext.sources) is expected
    assert "-fopenmp" in ext.extra_compile_args["cxx"] and "-fopenmp" in ext.extra_link_args
