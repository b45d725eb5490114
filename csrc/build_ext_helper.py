"""Build recipe for the optional extension ``fastmmt._C`` (imported by setup.py).

Always builds the C++ CPU path (``ema.cpp``, ``memory.cpp``). Adds the CUDA path (``ema_cuda_binding.cpp`` +
``ema_kernel.cu``) when torch was built with CUDA and an nvcc of the same CUDA major version is
found; ``FASTMMT_CUDA=0`` / ``=1`` forces it off / on. When the CUDA path is skipped or its build
fails, one line says why and the CPU-only extension is built; a failing CPU build prints a
warning: the package then installs without ``fastmmt._C`` and ``fastmmt.ops`` uses
``torch._foreach_lerp_`` (setuptools' ``optional=True`` alone would still fail the install).
``fastmmt._C.has_cuda()`` tells which was built. Without a GPU visible at build time the CUDA
path is compiled for ``DEFAULT_CUDA_ARCHS`` (``TORCH_CUDA_ARCH_LIST`` overrides; with a GPU
visible torch compiles for that GPU).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

NAME = "fastmmt._C"
CPU_SOURCES = ["csrc/ema.cpp", "csrc/memory.cpp"]
CUDA_SOURCES = ["csrc/ema_cuda_binding.cpp", "csrc/ema_kernel.cu"]
# -fopenmp in compile AND link flags, else at::parallel_for runs on one thread.
# No -std: torch's BuildExtension picks the standard its headers need (C++20 for torch 2.13).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]  # -g0: no debug info (Python's CFLAGS add -g)
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]
CUDA_MACRO = ("FASTMMT_WITH_CUDA", "1")
# Ampere (A100), Ampere consumer (RTX 30xx, A10, A40), Hopper (H100) + PTX that later GPUs JIT.
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"
DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"
# DALI's CUDA 13 build bundles its own nvJPEG/nvimgcodec and runs CPU-only pipelines with no GPU;
# its GPU pipelines need driver >= 580, else CUDA 12's build (driver >= 525).
DALI_CUDA13, DALI_CUDA12 = "nvidia-dali-cuda130>=2.0", "nvidia-dali-cuda120>=2.0"
DALI_CUDA13_MIN_DRIVER = 580


def _warn(msg: str) -> None:
    print(f"WARNING [fastmmt._C]: {msg}", file=sys.stderr)


def _say(msg: str) -> None:
    print(f"[fastmmt._C] {msg}", file=sys.stderr)


def _torch_cuda_home() -> str | None:
    """Where torch's extension build finds CUDA (its own search: env, nvcc on PATH, /usr/local/cuda)."""
    try:
        from torch.utils import cpp_extension
    except Exception:  # torch missing or broken: no torch-found CUDA
        return None
    return cpp_extension.CUDA_HOME


def find_nvcc() -> str | None:
    """The first nvcc of: $CUDA_HOME, $CUDA_PATH, the CUDA torch's build uses, PATH,
    /usr/local/cuda (torch's build compiles with the one under its CUDA home)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _torch_cuda_home()]
    candidates = [os.path.join(h, "bin", "nvcc") for h in homes if h]
    candidates += [shutil.which("nvcc"), DEFAULT_NVCC]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def dali_requirement(driver_version: str | None) -> str:
    """The DALI build for this machine's NVIDIA driver: CUDA 13's needs driver >= 580; an older
    driver gets CUDA 12's (>= 525), which runs GPU pipelines there; no driver (a CPU machine):
    CUDA 13's, whose CPU-only pipelines need none."""
    try:
        major = int(str(driver_version).split(".")[0])
    except ValueError:
        return DALI_CUDA13
    return DALI_CUDA13 if major >= DALI_CUDA13_MIN_DRIVER else DALI_CUDA12


def nvcc_version(nvcc: str) -> str | None:
    """``"13.0"`` from ``nvcc --version`` ("... release 13.0, V13.0.88"), None if unreadable."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_skip_reason(torch_cuda: str | None, nvcc: str | None, nvcc_ver: str | None) -> str | None:
    """Why the CUDA path cannot be built (None when it can): torch's CUDA and nvcc must agree on
    the major version (torch's build refuses a mismatch)."""
    if torch_cuda is None:
        return "torch is a CPU-only build"
    if nvcc is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if nvcc_ver is None:
        return f"cannot read the CUDA version of {nvcc}"
    if torch_cuda.split(".")[0] != nvcc_ver.split(".")[0]:
        return (f"torch was built with CUDA {torch_cuda} but {nvcc} is CUDA {nvcc_ver} "
                "(install the toolkit matching torch, or point CUDA_HOME at it)")
    return None


def cuda_wanted() -> bool:
    """Whether to try the CUDA path: FASTMMT_CUDA=0/1 decides, else :func:`cuda_skip_reason`
    (printing one line with the reason when it says no)."""
    env = os.environ.get("FASTMMT_CUDA", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"FASTMMT_CUDA must be 0, 1 or unset, got {env!r}")
    if env:
        return env == "1"
    import torch

    nvcc = find_nvcc()
    reason = cuda_skip_reason(torch.version.cuda, nvcc, nvcc_version(nvcc) if nvcc else None)
    if reason is not None and torch.cuda.is_available():
        _warn(f"a GPU is visible but the extension is built WITHOUT its CUDA kernel: {reason}; the EMA "
              "of CUDA tensors falls back to torch._foreach_lerp_")
    elif reason is not None:
        _say(f"building the CPU path only, CUDA skipped: {reason}")
    return reason is None


def cuda_arch_list(gpu_visible: bool) -> str | None:
    """The arch list to compile for: TORCH_CUDA_ARCH_LIST if set; None (torch targets the
    visible GPUs) when a GPU is visible; else :data:`DEFAULT_CUDA_ARCHS`."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    return None if gpu_visible else DEFAULT_CUDA_ARCHS


def _link_flags() -> list[str]:
    """OpenMP, plus an rpath to torch's libraries so ``import fastmmt._C`` works before torch."""
    from torch.utils.cpp_extension import library_paths

    return LINK_FLAGS + [f"-Wl,-rpath,{path}" for path in library_paths()]


def _cpu_extension():
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(NAME, CPU_SOURCES, extra_compile_args={"cxx": list(CXX_FLAGS)},
                        extra_link_args=_link_flags())


def _cuda_extension():
    import torch
    from torch.utils.cpp_extension import CUDAExtension

    ext = CUDAExtension(NAME, CPU_SOURCES + CUDA_SOURCES, define_macros=[CUDA_MACRO],
                        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
                        extra_link_args=_link_flags())
    archs = cuda_arch_list(torch.cuda.is_available())
    if archs is not None and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        _say(f"no GPU visible at build time: compiling the CUDA path for {archs} "
             "(set TORCH_CUDA_ARCH_LIST to choose)")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's BuildExtension
    return ext


def _to_cpu(ext) -> None:
    """Turn the CUDA extension ``ext`` into the CPU-only one, in place."""
    cpu = _cpu_extension()
    # Keep the flags BuildExtension already added (extension name, ABI) in extra_compile_args.
    ext.sources, ext.define_macros = cpu.sources, cpu.define_macros
    ext.libraries, ext.library_dirs = cpu.libraries, cpu.library_dirs
    ext.include_dirs = cpu.include_dirs
    if isinstance(ext.extra_compile_args, dict):
        ext.extra_compile_args.pop("nvcc", None)


def _is_cuda(ext) -> bool:
    return CUDA_MACRO in (ext.define_macros or [])


def _make_build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class SafeBuildExt(BuildExtension):
        """build_ext that falls back CUDA -> CPU-only -> no extension instead of failing."""

        def run(self) -> None:
            # BuildExtension checks the compiler and torch's CUDA against nvcc before any
            # extension is built: a failure there drops the CUDA path, not the extension.
            try:
                super().run()
                return
            except Exception as err:
                cuda = [ext for ext in self.extensions if _is_cuda(ext)]
                if not cuda:
                    _warn(f"build failed ({err}); installing without the extension "
                          "(fastmmt.ops falls back to torch._foreach_lerp_)")
                    return
                _say(f"building the CPU path only, CUDA skipped: {str(err).strip().splitlines()[0]}")
                for ext in cuda:
                    _to_cpu(ext)
            try:
                super().run()
            except Exception as err:
                _warn(f"build failed ({err}); installing without the extension "
                      "(fastmmt.ops falls back to torch._foreach_lerp_)")

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
                return
            except Exception as err:  # compiler/linker errors come in several exception types
                if not _is_cuda(ext):
                    _warn(f"build failed ({err}); installing without the extension "
                          "(fastmmt.ops falls back to torch._foreach_lerp_)")
                    return
                _say(f"building the CPU path only, CUDA build failed: {err}")
            _to_cpu(ext)
            self.build_extension(ext)

    return SafeBuildExt


def extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(), or {} (with a warning) when torch is missing."""
    try:
        import torch  # noqa: F401  (the build needs the installed torch: --no-build-isolation)
    except ImportError:
        _warn("torch is not importable at build time; installing without the extension")
        return {}
    ext = None
    if cuda_wanted():
        try:
            ext = _cuda_extension()
        except Exception as err:  # e.g. CUDA_HOME unknown with a CPU-only torch
            _say(f"building the CPU path only, CUDA skipped: cannot configure the CUDA build ({err})")
    if ext is None:
        ext = _cpu_extension()
    return {"ext_modules": [ext], "cmdclass": {"build_ext": _make_build_ext()}}
