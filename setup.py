"""Build and install fastmmt.

The library is pure Python except the optional extension ``fastmmt._C`` built from ``csrc/``
(multi-tensor EMA, the memory banks' CPU update). The extension build never fails the install:
without it, ``fastmmt.ops`` falls back to ``torch._foreach_lerp_`` and the torch memory update. Install with ``pip install -e . --no-build-isolation`` so the
build uses the torch already installed (an isolated build would fetch a multi-GB torch).
"""
from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "csrc"), HERE]  # the build helper, and fastmmt.machine (no torch)

REQUIRES = [
    # 2.13.0 (CPU wheel on local disk) must satisfy every range: a CUDA machine keeps its torch.
    "torch>=2.4,<2.15",
    "triton>=3.1,<3.10",
    "numpy>=1.24",
    "pillow>=10",
    "faiss-gpu>=1.8",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "scikit-learn>=1.3",  # the paper configs' k-means (the official code's KMeans)
]

packages = find_packages(include=["fastmmt", "fastmmt.*"]) + ["fastmmt.kernels"]
package_dir = {"fastmmt.kernels": "kernels"}


def _dali_requirement() -> list[str]:
    """DALI's build for this machine's NVIDIA driver (csrc/build_ext_helper.dali_requirement)."""
    from build_ext_helper import dali_requirement  # csrc/build_ext_helper.py

    from fastmmt.machine import nvidia_driver_version  # no torch needed

    return [dali_requirement(nvidia_driver_version())]


def _ext_kwargs() -> dict:
    """Extension modules and build command, or nothing when the build helper is unavailable."""
    try:
        from build_ext_helper import extension_kwargs  # csrc/build_ext_helper.py
    except ImportError:
        return {}
    return extension_kwargs()


setup(
    name="fastmmt",
    version="0.1.0",
    description="Fast, faithful Mutual Mean-Teaching for unsupervised domain-adaptive person re-ID",
    packages=packages,
    package_dir=package_dir,
    python_requires=">=3.10",
    install_requires=REQUIRES + _dali_requirement(),
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "scikit-learn>=1.3", "ninja"]},
    entry_points={"console_scripts": ["fastmmt=fastmmt.cli:main"]},
    **_ext_kwargs(),
)
