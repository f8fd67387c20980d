"""bench/gpu_check.sh: its CPU dry run does every stage and writes every table; a stage it cannot run fails it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args, timeout=600):
    # the interpreter running the tests (the venv's): `make test PYTHON=python3` exports PYTHON, the bootstrap
    # interpreter, which has no torch
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})


def test_dry_run_runs_every_stage_and_writes_the_tables(tmp_path):
    p = _run("--dry-run", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "gpu-check-dryrun.md").read_text()
    assert "**PASS**" in summary and "commit" in summary and "date" in summary
    for stage in ("extension", "tests", "kernels", "overlap"):
        assert f"| {stage} | ok |" in summary, summary
    # the tests stage really ran op and kernel tests through the device path, none failed
    assert "0 failed, 0 errors" in summary and " 0 tests" not in summary, summary
    kernels = (tmp_path / "kernels-dryrun.md").read_text()
    assert "| project_residual | triton |" in kernels and "| decompress | triton |" in kernels
    overlap = (tmp_path / "comm-overlap-dryrun.md").read_text()
    assert "| tiny |" in overlap and "| lore |" in overlap
    # the targets are assessed from those tables (on toy CPU sizes: no claim)
    assert "## Targets" in summary and "project_residual" in summary.split("## Targets")[1]
    import tarfile

    with tarfile.open(tmp_path / "gpu-check-logs.tar.gz") as tar:  # the logs, packed: one file
        names = tar.getnames()
    assert "gpu-check-logs/tests.log" in names and "gpu-check-logs/overlap.log" in names, names
    assert len(list(tmp_path.iterdir())) <= 8  # what a lent machine returns from $OUT


def test_a_stage_without_budget_fails_the_check(tmp_path):
    p = _run("--dry-run", "--out", str(tmp_path), "--budget-s", "5", timeout=120)
    assert p.returncode == 1, p.stdout[-2000:]
    summary = (tmp_path / "gpu-check-dryrun.md").read_text()
    assert "**FAIL**" in summary and "not run:" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_real_check_refuses(tmp_path):
    p = _run("--out", str(tmp_path), timeout=120)
    assert p.returncode == 2 and "--dry-run" in p.stderr, p.stderr


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_summary_reads_wrong_results_and_only_lorecomms_rows():
    gc = _gpu_check_module()
    row = dict(impl="triton", op="decompress", B=1, a=64, b=64, r=8, copy_frac=0.9, speedup=3.0)
    assert gc.kernel_targets([{**row, "relerr": 1e-6}])[0].startswith("met: decompress")
    assert gc.kernel_targets([{**row, "relerr": 0.5}])[0].startswith("WRONG: decompress")  # fast and wrong
    assert gc.kernel_targets([{**row, "relerr": float("nan")}])[0].startswith("WRONG: decompress")
    table = "\n".join([
        "| model | params | method | backward | compress | comm | step | exposed | exposed/bwd | overlap | msgs | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| small | 1M | dense | 10.0 | 0.0 | 30.0 | 40.0 | 30.0 | 300% | 0% | 2 | 4 |",
        "| small | 1M | powersgd (1 bucket) | 10.0 | 5.0 | 1.0 | 20.0 | 10.0 | 100% | 0% | 2 | 1 |",
        "| small | 1M | lore | 10.0 | 5.0 | 1.0 | 10.5 | 0.5 | 5% | 90% | 2 | 1 |"])
    lines = gc.overlap_targets(table)
    assert len(lines) == 1 and lines[0].startswith("met: overlap small lore"), lines  # torch's hook is not ours


def test_a_missing_or_cut_junit_file_is_said(tmp_path):
    gc = _gpu_check_module()
    assert "cut short" in gc.junit_summary(tmp_path / "none.xml")["missing"]
    (tmp_path / "cut.xml").write_text("<testsuites><testsuite tests='3'")
    assert "unreadable" in gc.junit_summary(tmp_path / "cut.xml")["missing"]
