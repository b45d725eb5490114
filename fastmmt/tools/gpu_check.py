"""Does the GPU path work here? One command on a CUDA machine; writes ``gpu_check/REPORT.md``.

Run by ``scripts/gpu_check.sh`` (``--system``: the machine's own Python, nothing installed; else
``.venv`` set up by ``scripts/dev.sh``). Steps, each recorded with its outcome, time and output
tail, none stopping the others:

1. versions: GPU, driver, torch / CUDA / Triton / DALI / FAISS / nvcc;
2. build ``fastmmt._C`` for this GPU's architecture and check ``has_cuda()`` in a fresh process;
3. the test suite (``gpu`` tests run on CUDA; ``--quick`` leaves out ``slow``; pytest-xdist spreads
   it over ``--jobs`` processes where installed);
4. ``compute-sanitizer --tool memcheck`` on :mod:`fastmmt.tools.kernel_sweep` (every Triton
   kernel forward and backward at N 65, D 129, K 1025) with torch's caching allocator off, so an
   out-of-bounds tile is outside any allocation;
5. :mod:`fastmmt.tools.gpu_profile`: a synthetic MMT run at the paper's shape, once per
   non-finite policy, with host syncs counted inside the training step only;
6. the loss, EMA, pipeline and memory-bank benchmarks against their references (pytest-benchmark JSON;
   ``--quick``: the GPU rows only).

The report's "Parts" table says of each GPU part: PASS, FAIL or NOT INSTALLED HERE. The exit code
is 0 only when every part that is installed passed: a GPU the driver lists but torch cannot use,
an extension without its CUDA kernel, a training step that syncs, or the torch loader running
where DALI is installed all fail it. Without a GPU listed it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from fastmmt.machine import listed_nvidia_gpus, nvidia_driver_version

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ("bench/bench_mmt_loss.py", "bench/bench_ema.py", "bench/bench_pipelines.py",
           "bench/bench_cluster_memory.py", "bench/bench_hybrid_memory.py")
# --quick: the GPU rows only (the CPU references they compare against run inside each row)
QUICK_BENCH_FILTER = "cuda or gpu"
# Seconds each step may take: --quick must fit a short lease (all of it under 8 minutes on one H100).
QUICK_LIMITS = {"build": 90, "suite": 180, "sanitizer": 60, "mmt": 100, "bench": 50}
FULL_LIMITS = {"build": 600, "suite": 7200, "sanitizer": 1800, "bench": 3600, "mmt": 1800}
SANITIZER_FALLBACK = "/usr/local/cuda/bin/compute-sanitizer"  # the toolkit's, when not on PATH
NO_CUDA = "gpu_check: no NVIDIA GPU listed and no CUDA device visible to torch; nothing to check"
PASS, FAIL, NOT_INSTALLED = "PASS", "FAIL", "NOT INSTALLED HERE"


@dataclass
class Step:
    """One check: ``ok`` True/False, or None when it could not run (``detail`` says why)."""

    name: str
    ok: bool | None
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Part:
    """One GPU part of fastmmt and what the check found: PASS, FAIL or NOT INSTALLED HERE."""

    name: str
    status: str
    detail: str


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

    out = {"python": f"{sys.version.split()[0]} ({sys.executable})", "torch": torch.__version__,
           "torch CUDA": str(torch.version.cuda), "triton": _module_version("triton"),
           "DALI": _module_version("nvidia.dali"), "FAISS": _module_version("faiss")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        out["GPU"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB)"
        out["GPUs visible"] = str(torch.cuda.device_count())
    else:
        out["GPU"] = "none visible to torch"
    out["GPUs listed by the driver"] = str(len(listed_nvidia_gpus()))
    out["driver"] = nvidia_driver_version() or "unknown (nvidia-smi not available)"
    nvcc = _command_output(["nvcc", "--version"])
    out["nvcc"] = nvcc.splitlines()[-1] if nvcc else "not found on PATH"
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
    # its own process group: on a time-out the whole tree goes (pytest-xdist workers, compilers)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, ok = f"{proc.communicate()[0]}\ntimed out after {timeout:.0f} s (step killed)", False
    if log_dir is not None:
        (log_dir / f"{name.replace(' ', '_')}.log").write_text(f"$ {' '.join(cmd)}\n{output}")
    extra = {"command": " ".join(cmd)}
    if env:
        extra["env"] = " ".join(f"{k}={v}" for k, v in env.items())
    return Step(name, ok, time.perf_counter() - t0, _tail(output), extra)


def gpu_arch() -> str:
    """``major.minor`` of the current GPU, the form TORCH_CUDA_ARCH_LIST takes."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def build_step(log_dir: Path, timeout: float = 600) -> Step:
    """Build the extension in place for this GPU and check, in a new process, that CUDA is in."""
    env = {"TORCH_CUDA_ARCH_LIST": gpu_arch(), "FASTMMT_CUDA": "1"}
    step = run_step("build extension", [sys.executable, "setup.py", "build_ext", "--inplace"], env,
                    timeout=timeout, log_dir=log_dir)
    check = run_step("has_cuda", [sys.executable, "-c", "import fastmmt._C as c; print(c.has_cuda())"],
                     log_dir=log_dir)
    built = check.ok and check.detail.strip().splitlines()[-1:] == ["True"]
    step.ok = bool(step.ok and built)
    step.extra["has_cuda"] = bool(built)
    step.detail = (f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}; fastmmt._C.has_cuda() -> "
                   f"{check.detail.strip().splitlines()[-1] if check.detail.strip() else '(no output)'}\n"
                   + step.detail)
    return step


def suite_command(out: Path, quick: bool, jobs: int) -> list[str]:
    """The test suite's pytest command: junit XML for the counts, xdist where installed."""
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-ra", f"--junitxml={out / 'tests.xml'}",
           "-p", "no:cacheprovider"]
    if quick:
        cmd += ["-m", "not slow"]
    if jobs > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(jobs), "--dist", "loadfile"]
    return cmd


def junit_counts(path: Path) -> dict:
    """Tests passed / failed / skipped in a pytest junit XML, with the skip reasons counted."""
    if not path.exists():
        return {}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": {}}
    for case in ET.parse(path).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "").split(":", 1)[0].strip() or "unnamed"
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts


def sanitizer_step(log_dir: Path | None, timeout: float = 1800) -> Step:
    """compute-sanitizer memcheck over every Triton kernel; torch's caching allocator off, else an
    out-of-bounds tile lands inside a cached block and memcheck stays silent."""
    sweep = [sys.executable, "-m", "fastmmt.tools.kernel_sweep", "--n", "65", "--d", "129", "--k", "1025"]
    tool = shutil.which("compute-sanitizer") or SANITIZER_FALLBACK
    return run_step("compute-sanitizer memcheck", [tool, "--tool", "memcheck", "--error-exitcode", "1", *sweep],
                    env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, timeout=timeout, log_dir=log_dir)


def summarize_benchmarks(data: dict) -> list[dict]:
    """Rows (name, median seconds, the ratio entries of ``extra_info``) of a pytest-benchmark JSON."""
    rows = []
    for b in data.get("benchmarks", []):
        extra = {k: v for k, v in (b.get("extra_info") or {}).items()
                 if "ratio" in k or "speedup" in k or k.startswith("x_")}
        rows.append({"name": b.get("fullname", b.get("name")), "median_s": b["stats"]["median"], "ratios": extra})
    return rows


def parts(steps: dict[str, Step], profile: dict | None, info: dict[str, str]) -> list[Part]:
    """Each GPU part's verdict from what ran (``steps`` by name, the profiled run's summary)."""
    out = []
    build = steps.get("build extension")
    if build is not None:
        out.append(Part("EMA extension, CUDA kernel", PASS if build.ok else FAIL,
                        "fastmmt._C.has_cuda() is True" if build.ok else "built without its CUDA kernel "
                        "(see the build step: nvcc, CUDA version)"))
    suite = steps.get("test suite")
    if suite is not None:
        counts = suite.extra.get("counts") or {}
        out.append(Part("Triton kernels and the library on CUDA (test suite)", PASS if suite.ok else FAIL,
                        f"{counts.get('passed', '?')} passed, {counts.get('failed', '?')} failed, "
                        f"{counts.get('skipped', '?')} skipped"))
    san = steps.get("compute-sanitizer memcheck")
    if san is not None:
        out.append(Part("Triton kernels under compute-sanitizer", NOT_INSTALLED if san.ok is None else
                        PASS if san.ok else FAIL, san.detail.splitlines()[0] if san.ok is None else
                        "memcheck, caching allocator off"))
    dali_installed = not info.get("DALI", "not").startswith("not")
    faiss_gpus = int(info.get("FAISS GPUs", "0") or 0)
    if profile is None:
        out.append(Part("training step without host syncs", FAIL, "the profiled MMT run did not finish"))
        return out
    data = profile["backends"]["data"]
    if not dali_installed:
        out.append(Part("DALI GPU pipelines", NOT_INSTALLED, f"nvidia-dali not importable; the {data} loader ran"))
    else:
        out.append(Part("DALI GPU pipelines", PASS if data == "dali" else FAIL, f"the {data} loader ran"))
    clustering = profile["backends"]["clustering"]
    if info.get("FAISS", "not").startswith("not") or faiss_gpus == 0:
        out.append(Part("FAISS on the GPU", NOT_INSTALLED,
                        f"FAISS {'not importable' if info.get('FAISS', 'not').startswith('not') else 'sees no GPU'}; "
                        f"clustering ran on {clustering}"))
    else:
        out.append(Part("FAISS on the GPU", PASS if clustering == "faiss-gpu" else FAIL, f"clustering ran on {clustering}"))
    for policy, s in profile["step_syncs"].items():
        out.append(Part(f"training step without host syncs (run.on_nonfinite={policy})",
                        PASS if s["total"] == 0 and s["steps"] > 0 else FAIL,
                        f"{s['total']} syncs over {s['steps']} steps"
                        + (f"; first at {s['where'][0][0]}" if s["where"] else "")))
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _profile_section(summary: dict) -> str:
    prof = summary["profile"]
    backends = {"losses": prof["loss_backend"] + (f" ({', '.join(prof['loss_kernels'])})" if prof["loss_kernels"] else ""),
                "EMA (kernels seen)": prof["ema_backend_seen"], **summary["backends"]}
    out = ["Backends that ran:", _table(["part", "backend"], [[k, v] for k, v in backends.items()])]
    for policy, syncs in summary["step_syncs"].items():
        out += [f"\nHost syncs inside the training step, run.on_nonfinite={policy}: {syncs['total']} over "
                f"{syncs['steps']} steps ({syncs['per_step']:.2f} per step)."]
        if syncs["where"]:
            out.append(_table(["location", "count"], [[w, n] for w, n in syncs["where"]]))
    out += ["\nSeconds per phase:",
            _table(["phase", "seconds"], [[k, f"{v:.2f}"] for k, v in summary["seconds"].items()
                                         if isinstance(v, (int, float))]),
            f"\nTop ops by {prof['ranked_by']}:",
            _table(["op / kernel", "calls", "self device ms", "self CPU ms"],
                   [[r["name"][:80], r["calls"], f"{r['self_device_us'] / 1e3:.2f}", f"{r['self_cpu_us'] / 1e3:.2f}"]
                    for r in prof["top"]])]
    return "\n".join(out)


def write_report(path: Path, info: dict[str, str], steps: list[Step], profile: dict | None = None,
                 benchmarks: list[dict] | None = None, part_list: list[Part] | None = None,
                 verdict: str = "") -> str:
    """Write the Markdown report; returns its text."""
    mark = {True: "PASS", False: "FAIL", None: "NOT RUN"}
    lines = ["# fastmmt GPU check", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by "
             "`bash scripts/gpu_check.sh`.", ""]
    if verdict:
        lines += [f"**{verdict}**", ""]
    lines += ["## Machine", "", _table(["item", "version"], [[k, v] for k, v in info.items()])]
    if part_list:
        lines += ["", "## Parts", "", _table(["part", "result", "detail"], [[p.name, p.status, p.detail]
                                                                           for p in part_list])]
    if steps:
        lines += ["", "## Steps", "",
                  _table(["step", "result", "seconds"], [[s.name, mark[s.ok], f"{s.seconds:.1f}"] for s in steps])]
    for s in steps:
        lines += ["", f"### {s.name}: {mark[s.ok]}", ""]
        if s.extra.get("command"):
            lines += [f"`{(s.extra['env'] + ' ') if s.extra.get('env') else ''}{s.extra['command']}`", ""]
        lines += ["```", s.detail or "(no output)", "```"]
    if benchmarks:
        lines += ["", "## Benchmarks (median; ratios from each benchmark's own reference)", "",
                  _table(["benchmark", "median ms", "ratios"],
                         [[b["name"], f"{b['median_s'] * 1e3:.3f}", json.dumps(b["ratios"]) if b["ratios"] else ""]
                          for b in benchmarks])]
    if profile:
        sh = profile["shape"]
        lines += ["", f"## Synthetic MMT run ({sh['arch']}, {sh['height']}x{sh['width']}, batch {sh['batch']}, "
                  f"{sh['views']} views, {sh['iters']} steps per policy, {sh['device']})", "", _profile_section(profile)]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def unusable_gpu_report(out: Path, gpus: list[str], env: str) -> str:
    """The report when the driver lists a GPU but this Python's torch cannot use it (or has none)."""
    try:
        import torch  # noqa: F401
    except ImportError as err:
        reason = f"{sys.executable} cannot import torch ({err})"
        info = {"python": f"{sys.version.split()[0]} ({sys.executable})", "torch": "not importable"}
    else:
        from fastmmt.train.runtime import cuda_unusable_reason

        reason = cuda_unusable_reason()
        info = versions()
    hint = ("run `bash scripts/gpu_check.sh --system` to use the machine's own python3" if env == "venv"
            else "set FASTMMT_PYTHON to a Python whose torch is a CUDA build")
    verdict = (f"FAIL: nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}) but {reason}. Nothing on the GPU was "
               f"checked; {hint}.")
    part = Part("CUDA torch", FAIL, reason)
    return write_report(out / "REPORT.md", info, [], part_list=[part], verdict=verdict)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check", help="report folder (relative to the repository)")
    p.add_argument("--quick", action="store_true", help="leave the slow tests and the CPU-only benchmark rows out")
    p.add_argument("--iters", type=int, default=20, help="training steps of each profiled MMT run")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="test processes (pytest-xdist, where installed)")
    p.add_argument("--env", choices=("venv", "system"), default="venv",
                   help="set by scripts/gpu_check.sh: which Python runs the check")
    args = p.parse_args(argv)
    out = ROOT / args.out
    gpus = listed_nvidia_gpus()
    try:
        import torch
        usable = torch.cuda.is_available()
    except ImportError:
        usable = False
    if not usable:
        if not gpus:
            print(NO_CUDA)
            return 0
        out.mkdir(parents=True, exist_ok=True)
        text = unusable_gpu_report(out, gpus, args.env)
        print(next(ln for ln in text.splitlines() if ln.startswith("**FAIL")).strip("*"))
        print(f"gpu_check: report: {out / 'REPORT.md'}")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    info = versions()
    info["check run by"] = f"{args.env} ({sys.executable})"
    limits = QUICK_LIMITS if args.quick else FULL_LIMITS
    t_all = time.perf_counter()
    steps: list[Step] = []

    def report(profile: dict | None = None, benchmarks: list[dict] | None = None, done: bool = False) -> str:
        """The report so far (rewritten after every step: a run cut short still leaves one)."""
        part_list = parts({s.name: s for s in steps}, profile, info) if done else []
        failed = [s.name for s in steps if s.ok is False] + [p.name for p in part_list if p.status == FAIL]
        missing = [p.name for p in part_list if p.status == NOT_INSTALLED]
        verdict = ((f"FAIL: {'; '.join(dict.fromkeys(failed))}" if failed else "PASS" if done else "RUNNING")
                   + (f" (not installed here: {', '.join(missing)})" if missing else "")
                   + f"; {time.perf_counter() - t_all:.0f} s in all")
        write_report(out / "REPORT.md", info, steps, profile, benchmarks, part_list, verdict)
        return verdict

    steps.append(build_step(out, limits["build"]))
    report()
    suite = run_step("test suite", suite_command(out, args.quick, args.jobs), timeout=limits["suite"], log_dir=out)
    suite.extra["counts"] = junit_counts(out / "tests.xml")
    steps.append(suite)
    report()
    steps.append(sanitizer_step(out, limits["sanitizer"]))
    report()
    run_dir = out / "mmt_run"
    steps.append(run_step("synthetic MMT run", [sys.executable, "-m", "fastmmt.tools.gpu_profile", "--out",
                                                str(run_dir), "--iters", str(args.iters)],
                          timeout=limits["mmt"], log_dir=out))
    prof_json = run_dir / "profile.json"
    profile = json.loads(prof_json.read_text()) if prof_json.exists() else None
    report(profile)
    bench_json = out / "bench.json"
    bench_cmd = [sys.executable, "-m", "pytest", *BENCHES, "-q", "-p", "no:cacheprovider",
                 f"--benchmark-json={bench_json}"] + (["-k", QUICK_BENCH_FILTER] if args.quick else [])
    steps.append(run_step("benchmarks", bench_cmd, timeout=limits["bench"], log_dir=out))
    benchmarks = summarize_benchmarks(json.loads(bench_json.read_text())) if bench_json.exists() else None
    verdict = report(profile, benchmarks, done=True)
    print(f"gpu_check: {verdict}; report: {out / 'REPORT.md'}")
    return 0 if verdict.startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
