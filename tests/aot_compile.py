"""Compile named Triton kernel variants to sm_90 cubins with the real compiler (``kernels/aot.py``),
in a child process without the interpreter: the GPU path is at least built where there is no GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def compile_for_sm90(names: tuple[str, ...] | None, timeout: int = 1200,
                     dtypes: tuple[str, ...] = ("float32",)) -> dict[str, int]:
    """``{"<name>[<dtype>]": cubin bytes}`` for each kernel variant in ``names`` (None: all) and dtype."""
    code = ("import json; from fastmmt.kernels.aot import compile_all; "
            f"print(json.dumps(compile_all(90, {dtypes!r}, {names!r})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
