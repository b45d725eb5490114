"""Build recipe for the optional extension ``fastmmt._C`` (imported by setup.py).

Always builds the C++ CPU path (``ema.cpp``). Adds the CUDA path (``ema_cuda_binding.cpp`` +
``ema_kernel.cu``) when torch was built with CUDA and nvcc is found; ``FASTMMT_CUDA=0`` / ``=1``
forces it off / on. A failing CUDA build falls back to the CPU-only build, and a failing CPU build
prints a warning: the package then installs without ``fastmmt._C`` and ``fastmmt.ops`` uses
``torch._foreach_lerp_`` (setuptools' ``optional=True`` alone would still fail the install).
"""
from __future__ import annotations

import os
import shutil
import sys

NAME = "fastmmt._C"
CPU_SOURCES = ["csrc/ema.cpp"]
CUDA_SOURCES = ["csrc/ema_cuda_binding.cpp", "csrc/ema_kernel.cu"]
# -fopenmp in compile AND link flags, else at::parallel_for runs on one thread.
# No -std: torch's BuildExtension picks the standard its headers need (C++20 for torch 2.13).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]  # -g0: no debug info (Python's CFLAGS add -g)
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]
CUDA_MACRO = ("FASTMMT_WITH_CUDA", "1")


def _warn(msg: str) -> None:
    print(f"WARNING [fastmmt._C]: {msg}", file=sys.stderr)


def cuda_wanted() -> bool:
    """Whether to try the CUDA path: FASTMMT_CUDA=0/1 decides, else torch has CUDA and nvcc exists."""
    env = os.environ.get("FASTMMT_CUDA", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"FASTMMT_CUDA must be 0, 1 or unset, got {env!r}")
    if env:
        return env == "1"
    import torch

    nvcc_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    has_nvcc = shutil.which("nvcc") is not None or (
        nvcc_home is not None and os.path.exists(os.path.join(nvcc_home, "bin", "nvcc")))
    return torch.version.cuda is not None and has_nvcc


def _link_flags() -> list[str]:
    """OpenMP, plus an rpath to torch's libraries so ``import fastmmt._C`` works before torch."""
    from torch.utils.cpp_extension import library_paths

    return LINK_FLAGS + [f"-Wl,-rpath,{path}" for path in library_paths()]


def _cpu_extension():
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(NAME, CPU_SOURCES, extra_compile_args={"cxx": list(CXX_FLAGS)},
                        extra_link_args=_link_flags())


def _cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(NAME, CPU_SOURCES + CUDA_SOURCES, define_macros=[CUDA_MACRO],
                         extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
                         extra_link_args=_link_flags())


def _make_build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class SafeBuildExt(BuildExtension):
        """build_ext that falls back CUDA -> CPU-only -> no extension instead of failing."""

        def run(self) -> None:
            # BuildExtension checks the compiler before any extension is built: failures there too.
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
                if CUDA_MACRO not in (ext.define_macros or []):
                    _warn(f"build failed ({err}); installing without the extension "
                          "(fastmmt.ops falls back to torch._foreach_lerp_)")
                    return
                _warn(f"CUDA build failed ({err}); retrying the CPU-only build")
            cpu = _cpu_extension()
            # Keep the flags BuildExtension already added (extension name, ABI) in extra_compile_args.
            ext.sources, ext.define_macros = cpu.sources, cpu.define_macros
            ext.libraries, ext.library_dirs = cpu.libraries, cpu.library_dirs
            ext.include_dirs = cpu.include_dirs
            ext.extra_compile_args.pop("nvcc", None)
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
            _warn(f"cannot configure the CUDA build ({err}); building the CPU path only")
    if ext is None:
        ext = _cpu_extension()
    return {"ext_modules": [ext], "cmdclass": {"build_ext": _make_build_ext()}}
