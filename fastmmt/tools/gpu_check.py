"""Does the GPU path work here? One command on a CUDA machine; writes ``gpu_check/REPORT.md``.

Run by ``scripts/gpu_check.sh`` (which sets up ``.venv`` first). Steps, each recorded with its
outcome, time and output tail, none stopping the others:

1. versions: GPU, driver, torch / CUDA / Triton / DALI / FAISS / nvcc;
2. build ``fastmmt._C`` for this GPU's architecture and check ``has_cuda()`` in a fresh process;
3. the whole test suite (``gpu`` tests run on CUDA; ``--quick`` leaves out ``slow``);
4. ``compute-sanitizer --tool memcheck`` on :mod:`fastmmt.tools.kernel_sweep` (every Triton
   kernel forward and backward at N 65, D 129, K 1025);
5. the loss, EMA and pipeline benchmarks against their references (pytest-benchmark JSON);
6. :mod:`fastmmt.tools.gpu_profile`: a short synthetic MMT run at the paper's shape under sync
   debugging and the profiler (backends, host syncs per step, seconds per phase).

Without CUDA it prints one line and exits 0. The exit code is 1 when any step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ("bench/bench_mmt_loss.py", "bench/bench_ema.py", "bench/bench_pipelines.py")
NO_CUDA = "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); nothing to check"


@dataclass
class Step:
    """One check: ``ok`` True/False, or None when it could not run (``detail`` says why)."""

    name: str
    ok: bool | None
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


def _module_version(name: str) -> str:
    try:
        module = __import__(name, fromlist=["__version__"])
    except Exception as err:  # not installed, or fails to import (which is worth reporting)
        return f"not importable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return str(getattr(module, "__version__", "unknown"))


def _command_output(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def versions() -> dict[str, str]:
    """What this machine runs: GPU, driver and library versions ("none"/"not importable" named)."""
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torch CUDA": str(torch.version.cuda), "triton": _module_version("triton"),
           "DALI": _module_version("nvidia.dali"), "FAISS": _module_version("faiss")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        out["GPU"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB)"
        out["GPUs visible"] = str(torch.cuda.device_count())
    else:
        out["GPU"] = "none visible to torch"
    smi = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    out["driver"] = smi.splitlines()[0] if smi else "unknown (nvidia-smi not available)"
    nvcc = _command_output(["nvcc", "--version"])
    out["nvcc"] = nvcc.splitlines()[-1] if nvcc else "not found"
    if not out["FAISS"].startswith("not"):
        import faiss

        out["FAISS GPUs"] = str(faiss.get_num_gpus())
    return out


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_step(name: str, cmd: list[str], env: dict | None = None, timeout: float = 7200,
             log_dir: Path | None = None) -> Step:
    """Run ``cmd`` from the repository root; ok = exit code 0; the full log goes to ``log_dir``."""
    t0 = time.perf_counter()
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return Step(name, None, 0.0, f"`{cmd[0]}` not found")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        output, ok = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as err:
        output, ok = f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}", False
    if log_dir is not None:
        (log_dir / f"{name.replace(' ', '_')}.log").write_text(f"$ {' '.join(cmd)}\n{output}")
    return Step(name, ok, time.perf_counter() - t0, _tail(output), {"command": " ".join(cmd)})


def gpu_arch() -> str:
    """``major.minor`` of the current GPU, the form TORCH_CUDA_ARCH_LIST takes."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def build_step(log_dir: Path) -> Step:
    """Build the extension in place for this GPU and check, in a new process, that CUDA is in."""
    env = {"TORCH_CUDA_ARCH_LIST": gpu_arch(), "FASTMMT_CUDA": "1"}
    step = run_step("build extension", [sys.executable, "setup.py", "build_ext", "--inplace"], env,
                    log_dir=log_dir)
    check = run_step("has_cuda", [sys.executable, "-c", "import fastmmt._C as c; print(c.has_cuda())"],
                     log_dir=log_dir)
    built = check.ok and check.detail.strip().splitlines()[-1:] == ["True"]
    step.ok = bool(step.ok and built)
    step.detail = (f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}; fastmmt._C.has_cuda() -> "
                   f"{check.detail.strip().splitlines()[-1] if check.detail.strip() else '(no output)'}\n"
                   + step.detail)
    return step


def summarize_benchmarks(data: dict) -> list[dict]:
    """Rows (name, median seconds, the ratio entries of ``extra_info``) of a pytest-benchmark JSON."""
    rows = []
    for b in data.get("benchmarks", []):
        extra = {k: v for k, v in (b.get("extra_info") or {}).items() if "ratio" in k or "speedup" in k}
        rows.append({"name": b.get("fullname", b.get("name")), "median_s": b["stats"]["median"], "ratios": extra})
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _profile_section(summary: dict) -> str:
    prof, syncs = summary["profile"], summary["syncs"]
    backends = {"losses": prof["loss_backend"] + (f" ({', '.join(prof['loss_kernels'])})" if prof["loss_kernels"] else ""),
                "EMA": prof["ema_backend_seen"], **summary["backends"]}
    parts = ["Backends that ran:", _table(["part", "backend"], [[k, v] for k, v in backends.items()]),
             f"\nHost syncs: {syncs['total']} over {syncs['steps']} training steps "
             f"({syncs['per_step']:.2f} per step, extraction and clustering included). Where:",
             _table(["location", "count"], [[w, n] for w, n in syncs["where"]]) if syncs["where"] else "(none)",
             "\nSeconds per phase:",
             _table(["phase", "seconds"], [[k, f"{v:.2f}"] for k, v in summary["seconds"].items()
                                          if isinstance(v, (int, float))]),
             f"\nTop ops by {prof['ranked_by']}:",
             _table(["op / kernel", "calls", "self device ms", "self CPU ms"],
                    [[r["name"][:80], r["calls"], f"{r['self_device_us'] / 1e3:.2f}", f"{r['self_cpu_us'] / 1e3:.2f}"]
                     for r in prof["top"]])]
    return "\n".join(parts)


def write_report(path: Path, info: dict[str, str], steps: list[Step], profile: dict | None = None,
                 benchmarks: list[dict] | None = None) -> str:
    """Write the Markdown report; returns its text."""
    mark = {True: "PASS", False: "FAIL", None: "NOT RUN"}
    lines = ["# fastmmt GPU check", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by "
             "`bash scripts/gpu_check.sh`.", "", "## Machine", "",
             _table(["item", "version"], [[k, v] for k, v in info.items()]), "", "## Steps", "",
             _table(["step", "result", "seconds"], [[s.name, mark[s.ok], f"{s.seconds:.1f}"] for s in steps])]
    for s in steps:
        lines += ["", f"### {s.name}: {mark[s.ok]}", ""]
        if s.extra.get("command"):
            lines += [f"`{s.extra['command']}`", ""]
        lines += ["```", s.detail or "(no output)", "```"]
    if benchmarks:
        lines += ["", "## Benchmarks (median; ratios from each benchmark's own reference)", "",
                  _table(["benchmark", "median ms", "ratios"],
                         [[b["name"], f"{b['median_s'] * 1e3:.3f}", json.dumps(b["ratios"]) if b["ratios"] else ""]
                          for b in benchmarks])]
    if profile:
        sh = profile["shape"]
        lines += ["", f"## Synthetic MMT run ({sh['arch']}, {sh['height']}x{sh['width']}, batch {sh['batch']}, "
                  f"{sh['views']} views, {sh['iters']} steps, {sh['device']})", "", _profile_section(profile)]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check", help="report folder (relative to the repository)")
    p.add_argument("--quick", action="store_true", help="leave the slow tests out of the suite")
    p.add_argument("--iters", type=int, default=20, help="training steps of the profiled MMT run")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    info = versions()
    steps = [build_step(out)]
    suite = [sys.executable, "-m", "pytest", "tests", "-q", "-ra", f"--junitxml={out / 'tests.xml'}"]
    steps.append(run_step("test suite", suite + (["-m", "not slow"] if args.quick else []), log_dir=out))
    sweep = [sys.executable, "-m", "fastmmt.tools.kernel_sweep", "--n", "65", "--d", "129", "--k", "1025"]
    steps.append(run_step("compute-sanitizer memcheck",
                          ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", *sweep], log_dir=out))
    bench_json = out / "bench.json"
    steps.append(run_step("benchmarks", [sys.executable, "-m", "pytest", *BENCHES, "-q",
                                         f"--benchmark-json={bench_json}"], log_dir=out))
    benchmarks = summarize_benchmarks(json.loads(bench_json.read_text())) if bench_json.exists() else None
    run_dir = out / "mmt_run"
    steps.append(run_step("synthetic MMT run", [sys.executable, "-m", "fastmmt.tools.gpu_profile", "--out",
                                                str(run_dir), "--iters", str(args.iters)], log_dir=out))
    prof_json = run_dir / "profile.json"
    profile = json.loads(prof_json.read_text()) if prof_json.exists() else None
    write_report(out / "REPORT.md", info, steps, profile, benchmarks)
    print(f"gpu_check: {sum(s.ok is True for s in steps)}/{len(steps)} steps passed; report: {out / 'REPORT.md'}")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
