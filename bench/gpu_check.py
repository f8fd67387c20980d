"""The one command for a GPU machine (run through bench/gpu_check.sh): build, CUDA tests, kernel and overlap
benchmarks, every table under --out with device, date and commit, a summary at the end.

Stages, each under its own time limit and all under --budget-s (a stage that would start with less than its
minimum left is recorded as not run, which fails the check):
  1. build    pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST = this GPU's), then
              lorecomm._C.ENGINE_CUDA and the Triton kernels registered as the ops' CUDA kernels;
  2. tests    LORECOMM_TEST_DEVICE=cuda pytest tests/test_ops.py tests/test_kernels.py tests/test_cuda_engine.py:
              every op against float64 and opcheck on CUDA, the engine on CUDA buckets (NCCL at world size 1,
              2 ranks with Gloo on CUDA tensors, NCCL across 2+ GPUs where present; bit-identical replicas);
              any skip other than "needs 2 GPUs" fails;
  3. kernels  bench/kernels.py against the measured copy bandwidth -> kernels-<device>.md/.json; the issue's
              targets (project_residual and decompress >= 80% of copy bandwidth and >= 2x the unfused torch
              sequence; score_sketch within 1.2x of one read of G and E) reported as met or missed;
  4. overlap  bench/overlap.py --device cuda, 2 ranks with Gloo on CUDA tensors -> comm-overlap-<device>.md;
              the target (exposed under 10% of backward for compressed methods where dense comm > backward)
              reported as met or missed.
Missed performance targets are findings in the summary, not failures; a stage that errors is a failure
(exit status 1).

``--dry-run`` does all of it on the CPU: Triton interpreter, small sizes, LORECOMM_TEST_DEVICE=cpu (the op and
kernel tests through the same copy-to-device path, a subset), and without the build (it uses the installed
one; the build command is printed). tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from comm_util import git_commit  # noqa: E402

PY = sys.executable
ALLOWED_SKIPS = ("NCCL across GPUs needs 2",)  # the only skip a one-GPU machine may report
# seconds each stage needs at least, in run order: a stage never eats the minimum of the stages after it
# (the build, without which nothing runs, keeps up to 480 - 250 = 230 s of the default budget)
NEEDS = {"build": 60, "extension": 10, "tests": 80, "kernels": 80, "overlap": 80}


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "gpu-check-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.stages: list[dict] = []
        self.findings: list[str] = []

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def run(self, name: str, cmd: list[str], limit: float, env: dict | None = None) -> dict:
        """Run one command under min(limit, what is left after the later stages' minimums); its output in
        gpu-check-logs/<name>.log. On time-out the whole process group is killed (pytest workers, ranks)."""
        st = dict(stage=name, cmd=" ".join(shlex.quote(c) for c in cmd), ok=False, seconds=0.0, note="")
        self.stages.append(st)
        later = list(NEEDS)[list(NEEDS).index(name) + 1:]
        avail = self.left() - sum(NEEDS[n] for n in later)
        if avail < NEEDS[name]:
            st["note"] = f"not run: {self.left():.0f} s of the budget left, it needs {NEEDS[name]} s"
            self.log(f"{name}: {st['note']}")
            return st
        limit = min(limit, avail)
        self.log(f"{name}: {st['cmd']} (limit {limit:.0f} s)")
        t = time.monotonic()
        logf = self.logs / f"{name}.log"
        with open(logf, "w") as fh:
            # unbuffered: a stage killed at its limit keeps its log up to that moment
            p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=limit)
                st["ok"], st["rc"] = rc == 0, rc
                if rc:
                    st["note"] = f"exit status {rc}"
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                st["note"] = f"timed out after {limit:.0f} s"
        st["seconds"] = time.monotonic() - t
        tail = logf.read_text(errors="replace").splitlines()[-15:]
        self.log(f"{name}: {'ok' if st['ok'] else 'FAILED (' + st['note'] + ')'} in {st['seconds']:.0f} s")
        if not st["ok"]:
            print("\n".join("    " + line for line in tail), flush=True)
        return st


def device_info(dry: bool) -> dict:
    import torch
    import triton

    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=git_commit(), python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton.__version__, cpus=os.cpu_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, gpus=torch.cuda.device_count(), sms=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        info.update(device="cpu (dry run)" if dry else "no GPU", gpus=0)
    return info


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def junit_summary(path: Path) -> dict:
    """passed / failed / skipped counts and the skip reasons of a pytest junit file."""
    out = dict(tests=0, failures=0, errors=0, skipped=0, skips=[], missing=None)
    if not path.exists():
        out["missing"] = "no junit file (the run was cut short before pytest wrote it)"
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        out["missing"] = f"unreadable junit file ({e})"
        return out
    for suite in root.iter("testsuite"):
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(suite.get(k, 0))
    for case in root.iter("testcase"):
        for sk in case.findall("skipped"):
            out["skips"].append(f"{case.get('name')}: {sk.get('message', '')}")
    return out


def kernel_targets(rows: list[dict]) -> list[str]:
    """The issue's kernel targets, met or missed, for each measured row of the fused Triton kernels."""
    lines = []
    for r in rows:
        if r["impl"] != "triton":
            continue
        if r.get("relerr") is not None and not r["relerr"] <= 1e-2:  # NaN too
            lines.append(f"WRONG: {r['op']} {r['B']}x{r['a']}x{r['b']} r={r['r']}: relative error {r['relerr']:.1e} "
                         f"against float64 (its speed means nothing)")
            continue
        shape = f"{r['B']}x{r['a']}x{r['b']}" + (f" r={r['r']}" if r["op"] in ("range_sketch", "project_residual", "decompress") else "")
        if r["op"] in ("project_residual", "decompress"):
            ok = r["copy_frac"] >= 0.8 and r["speedup"] >= 2.0
            lines.append(f"{'met' if ok else 'MISSED'}: {r['op']} {shape}: {100 * r['copy_frac']:.0f}% of copy "
                         f"bandwidth (target >= 80%), {r['speedup']:.2f}x the unfused sequence (target >= 2x)")
        elif r["op"] == "score_sketch":
            ratio = 1 / r["copy_frac"] if r["copy_frac"] else float("inf")
            lines.append(f"{'met' if ratio <= 1.2 else 'MISSED'}: score_sketch {shape}: {ratio:.2f}x one read of "
                         f"G and E (target <= 1.2x)")
    return lines


def overlap_targets(md: str) -> list[str]:
    """The overlap target from the overlap table: compressed methods' exposed time under 10% of backward, for
    the models whose dense communication takes longer than their backward."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    dense_slow = {r[0] for r in rows if r[2] == "dense" and float(r[5]) > float(r[3])}
    lines = []
    for r in rows:
        if r[0] in dense_slow and not r[2].startswith(("dense", "powersgd")):  # lorecomm's methods
            exposed = float(r[7]) / float(r[3])
            lines.append(f"{'met' if exposed < 0.10 else 'MISSED'}: overlap {r[0]} {r[2]}: exposed {r[7]} ms = "
                         f"{100 * exposed:.0f}% of backward {r[3]} ms (dense comm {next(x[5] for x in rows if x[0] == r[0] and x[2] == 'dense')} ms; target < 10%)")
    if not dense_slow:
        lines.append("not assessed: no model's dense all-reduce took longer than its backward here")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dry-run", action="store_true", help="everything on the CPU: interpreter, small sizes, no build")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the tables go (default bench/results)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check (default 480)")
    ap.add_argument("--no-build", action="store_true", help="use the installed build (a rerun)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    chk = Check(args)
    info = device_info(dry)
    chk.log(f"device {info['device']}; torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, "
            f"Python {info['python']}, commit {info['commit']}")
    if not dry and info["gpus"] == 0:
        print("gpu_check: torch.cuda is not available; on a machine without a GPU run --dry-run", file=sys.stderr)
        return 2
    dev = slug(info["device"]) if not dry else "dryrun"
    try:
        run_stages(chk, info, dry, dev, args)
    except Exception as e:  # noqa: BLE001  (the summary and the logs are written whatever happened)
        chk.stages.append(dict(stage="gpu_check", ok=False, seconds=0.0, note=f"gpu_check itself failed: {e!r}"))
    finally:
        ok = write_summary(chk, info, dry, dev, args, argv)
    return 0 if ok else 1


def run_stages(chk: Check, info: dict, dry: bool, dev: str, args) -> None:
    jobs = str(os.cpu_count() or 2)

    # 1. build
    # -v: pip shows a successful build's output only so (the CMake line checked below is in it)
    build = [PY, "-m", "pip", "install", "-v", "--disable-pip-version-check", "--no-index", "--no-build-isolation",
             "--no-deps", "-e", "."]
    if dry or args.no_build:
        chk.log(f"build: skipped ({'dry run' if dry else '--no-build'}; would run: {' '.join(build)})")
    else:
        arch = info["capability"]
        env = dict(MAX_JOBS=jobs, TORCH_CUDA_ARCH_LIST=arch,
                   LORECOMM_CMAKE_ARGS=f"-DCMAKE_CUDA_ARCHITECTURES={arch.replace('.', '')}")
        nvcc = shutil.which("nvcc") or next((c for c in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(c)), None)
        if nvcc:  # CMake falls back to a CPU-only build when it finds no CUDA compiler
            env["CUDACXX"] = nvcc
        st = chk.run("build", build, limit=300, env=env)
        log = (chk.logs / "build.log").read_text(errors="replace")
        # (the extension stage checks the build itself: lorecomm._C.ENGINE_CUDA)
        if st["ok"] and "lorecomm: CUDA sources OFF" in log:
            st["ok"], st["note"] = False, f"CMake built without CUDA (nvcc: {nvcc or 'not found'})"
    probe = ("import lorecomm, lorecomm._C as C, lorecomm.ops as O; "
             "print('ENGINE_CUDA', C.ENGINE_CUDA, 'cuda ops', O.BACKEND.get('cuda')); "
             + ("" if dry else "import sys; sys.exit(not (C.ENGINE_CUDA and O.BACKEND.get('cuda') == 'triton'))"))
    chk.run("extension", [PY, "-c", probe], limit=120)

    # 2. tests
    xml = chk.logs / "tests.xml"
    files = ["tests/test_ops.py", "tests/test_kernels.py", "tests/test_cuda_engine.py"]
    # a module that fails at import (a missing GPU or CUDA engine raises there) must not stop the others
    cmd = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={xml}", *files]
    env = dict(LORECOMM_TEST_DEVICE="cpu" if dry else "cuda")
    if dry:
        cmd += ["-k", "decompress or cuda"]  # a subset: the CPU suite runs the rest
    else:
        # the interpreter's CPU smoke run of bench/kernels.py is not a GPU test (stage 3 runs it on CUDA)
        cmd += ["--deselect", "tests/test_kernels.py::test_bench_quick_runs_on_cpu"]
        try:
            import xdist  # noqa: F401  (Triton compiles each configuration once per process: spread them)

            cmd += ["-n", str(min(8, os.cpu_count() or 1))]
        except ImportError:
            pass
        try:
            import pytest_timeout  # noqa: F401  (a hung collective fails its test, not the whole stage)

            cmd += ["--timeout", "150"]
        except ImportError:
            pass
    st = chk.run("tests", cmd, limit=180, env=env)
    ju = junit_summary(xml)
    st["note"] = (st["note"] + "; " if st["note"] else "") + (ju["missing"] or
        f"{ju['tests']} tests, {ju['failures']} failed, {ju['errors']} errors, {ju['skipped']} skipped")
    bad_skips = [s for s in ju["skips"] if not any(a in s for a in ALLOWED_SKIPS)]
    if not dry and bad_skips:
        st["ok"] = False
        st["note"] += "; skipped on a GPU run: " + "; ".join(bad_skips[:5])

    # 3. kernels
    kjson, kmd = chk.out / f"kernels-{dev}.json", chk.out / f"kernels-{dev}.md"
    kcmd = [PY, "bench/kernels.py", "--json", str(kjson)] + (["--quick", "--device", "cpu"] if dry else ["--device", "cuda"])
    for stale in (kjson, kmd):  # a rerun into the same --out must not report an earlier run's rows
        stale.unlink(missing_ok=True)
    st = chk.run("kernels", kcmd, limit=150, env={"TRITON_INTERPRET": "1"} if dry else None)
    if kjson.exists():  # rows are written as they are measured: a stage cut short keeps its rows
        text = (chk.logs / "kernels.log").read_text(errors="replace")
        cut = "" if st["ok"] else f"- PARTIAL: the stage {st['note']}; the rows below are those measured\n"
        kmd.write_text(f"# Fused kernels on {info['device']}\n\n- date: {info['date']}; commit {info['commit']}\n"
                       f"- command: `{st['cmd']}`\n{cut}\n" + text)
        chk.findings += kernel_targets(json.loads(kjson.read_text())["rows"])

    # 4. overlap
    omd = chk.out / f"comm-overlap-{dev}.md"
    ocmd = [PY, "bench/overlap.py", "--world-size", "2", "--out", str(omd)]
    ocmd += (["--sizes", "tiny", "--warmup", "1", "--steps", "1", "--methods", "dense", "lore"] if dry else
             ["--device", "cuda", "--sizes", "small", "base", "--threads", "4"])
    omd.unlink(missing_ok=True)
    st = chk.run("overlap", ocmd, limit=150)
    if omd.exists():  # written after each model size: a stage cut short keeps the sizes it finished
        chk.findings += overlap_targets(omd.read_text())


def write_summary(chk: Check, info: dict, dry: bool, dev: str, args, argv) -> bool:
    ok = all(s["ok"] for s in chk.stages)
    lines = [f"# GPU check on {info['device']}", "",
             f"- date: {info['date']}; commit {info['commit']}",
             "- " + ", ".join(f"{k} {info[k]}" for k in ("gpus", "sms", "memory_gb", "capability", "driver", "torch",
                                                          "cuda", "triton", "python", "cpus") if k in info),
             f"- command: `bench/gpu_check.sh {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
             f"- result: **{'PASS' if ok else 'FAIL'}** in {time.monotonic() - chk.t0:.0f} s "
             f"(budget {args.budget_s:.0f} s)", "",
             "| stage | result | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {'ok' if s['ok'] else 'FAILED'} | {s['seconds']:.0f} | {s['note'] or '-'} |"
              for s in chk.stages]
    if chk.findings:
        lines += ["", "## Targets", ""] + (["(dry run: CPU numbers at toy sizes, no claim)", ""] if dry else []) + \
            [f"- {f}" for f in chk.findings]
    lines += ["", f"Logs: `gpu-check-logs.tar.gz` (one file: a lent machine returns few); "
              f"tables: `kernels-{dev}.md`, `comm-overlap-{dev}.md`."]
    summary = "\n".join(lines) + "\n"
    (chk.out / f"gpu-check-{dev}.md").write_text(summary)
    with tarfile.open(chk.out / "gpu-check-logs.tar.gz", "w:gz") as tar:
        tar.add(chk.logs, arcname="gpu-check-logs")
    shutil.rmtree(chk.logs)
    print("\n" + summary)
    return ok


if __name__ == "__main__":
    sys.exit(main())
