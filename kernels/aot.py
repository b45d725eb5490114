"""Ahead-of-time compilation of every kernel for a CUDA target, without a GPU.

On a machine with no GPU the kernels only run in Triton's interpreter, which skips the real
compiler (layouts, ``tl.dot`` shape rules, PTX/cubin generation). ``compile_all`` runs that
compiler for the block sizes the CUDA launchers use, so the GPU path is at least built. Run it in
a process WITHOUT ``TRITON_INTERPRET`` (otherwise ``@triton.jit`` yields interpreted functions):
``python -m fastmmt.kernels.aot [arch]``.
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmmt.kernels import distance, logits, memory, triplet

_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def _specs(dtype: str) -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """(name, kernel, signature, constexprs) of every variant the launchers can launch, at the CUDA
    block sizes (the logits kernels always get a teacher, labels or both)."""
    x, f32, i32, i64 = _PTR[dtype], "*fp32", "i32", "*i64"
    bm, bn, bd = distance.CUDA_BLOCKS
    lm, lk = logits.CUDA_BLOCKS
    tri_blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
    out = []
    triplet_sig = dict(x_ptr=x, t_ptr=x, lab_ptr=i64, loss_ptr=f32, ap_ptr="*i32", an_ptr="*i32", aux_ptr=f32,
                       N=i32, D=i32, stride_x=i32, stride_t=i32, hinge_margin="fp32", soft_weight="fp32")
    out.append(("triplet_fwd[teacher=False,hinge=True]", triplet._triplet_fwd, triplet_sig,
                {"HAS_TEACHER": False, "HINGE": True, **tri_blocks}))
    for has in (True, False):
        out.append((f"triplet_fwd[teacher={has}]", triplet._triplet_fwd, triplet_sig,
                    {"HAS_TEACHER": has, "HINGE": False, **tri_blocks}))
        out.append((f"pairwise_fwd[self={has}]", distance._pairwise_fwd, dict(
            x_ptr=x, y_ptr=x, out_ptr=f32, N=i32, M=i32, D=i32, stride_x=i32, stride_y=i32, stride_o=i32),
            {"SELF": has, **tri_blocks}))
        out.append((f"pairwise_bwd[self={has}]", distance._pairwise_bwd, dict(
            g_ptr=f32, d_ptr=f32, a_ptr=x, b_ptr=x, out_ptr=x, NA=i32, NB=i32, D=i32, sg0=i32, sg1=i32,
            sd0=i32, sd1=i32, stride_a=i32, stride_b=i32, stride_o=i32), {"SELF": has, **tri_blocks}))
        for has_lab in (True, False) if has else (True,):  # no launcher passes neither
            flags = {"HAS_TEACHER": has, "HAS_LABELS": has_lab, "BLOCK_M": lm, "BLOCK_K": lk}
            tag = f"[teacher={has},labels={has_lab}]"
            out.append(("logits_fwd" + tag, logits._logits_fwd, dict(
                s_ptr=x, t_ptr=x, lab_ptr=i64, loss_ptr=f32, lse_ptr=f32, N=i32, K=i32, stride_s=i32,
                stride_t=i32, epsilon="fp32", smooth="fp32"), flags))
            out.append(("logits_bwd" + tag, logits._logits_bwd, dict(
                s_ptr=x, t_ptr=x, lab_ptr=i64, lse_ptr=f32, g_ptr=f32, out_ptr=x, N=i32, K=i32,
                stride_s=i32, stride_t=i32, stride_o=i32, epsilon="fp32", smooth="fp32"), flags))
    out.append(("triplet_bwd", triplet._triplet_bwd, dict(
        x_ptr=x, ap_ptr="*i32", an_ptr="*i32", aux_ptr=f32, g_ptr=f32, out_ptr=x, N=i32, D=i32,
        stride_x=i32, stride_o=i32), tri_blocks))
    mm, mn, md = memory.CUDA_BLOCKS
    mem_blocks = {"BLOCK_M": mm, "BLOCK_N": mn, "BLOCK_D": md}
    out.append(("cluster_memory_fwd", memory._cm_fwd, dict(
        x_ptr=x, m_ptr=f32, t_ptr=i64, z_ptr=f32, row_ptr=f32, B=i32, K=i32, D=i32, stride_x=i32, stride_m=i32,
        stride_z=i32, inv_temp="fp32"), mem_blocks))
    out.append(("cluster_memory_bwd", memory._cm_bwd, dict(
        x_ptr=x, m_ptr=f32, t_ptr=i64, z_ptr=f32, row_ptr=f32, g_ptr=f32, out_ptr=x, B=i32, K=i32, D=i32,
        stride_x=i32, stride_m=i32, stride_z=i32, stride_o=i32, inv_temp="fp32"), mem_blocks))
    for hard in (False, True):  # the largest batch and feature width the issue names (B 256, D 2048)
        out.append((f"ordered_update[hard={hard}]", memory._ordered_update, dict(
            x_ptr=x, scale_ptr=f32, m_ptr=f32, t_ptr=i64, B=i32, K=i32, D=i32, stride_x=i32, stride_m=i32,
            momentum="fp32"), {"HARD": hard, "BLOCK_B": 256, "BLOCK_D": 2048}))
    return out


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16"),
                only: tuple[str, ...] | None = None) -> dict[str, int]:
    """Compile every kernel (or those named in ``only``, e.g. ``"triplet_bwd"``) for ``sm_<arch>``;
    returns {kernel[dtype]: cubin size in bytes}."""
    if not isinstance(triplet._triplet_fwd, triton.runtime.JITFunction):
        raise RuntimeError("kernels were loaded under TRITON_INTERPRET=1; compile in a process without it")
    target = GPUTarget("cuda", arch, 32)
    sizes = {}
    for dtype in dtypes:
        for name, fn, sig, consts in _specs(dtype):
            if only is not None and name not in only:
                continue
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
            sizes[f"{name}[{dtype}]"] = len(triton.compile(src, target=target).asm["cubin"])
    return sizes


if __name__ == "__main__":
    for key, size in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90).items():
        print(f"{key}: {size} bytes of cubin")
