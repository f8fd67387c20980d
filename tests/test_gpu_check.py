"""bench/gpu_check.sh: its CPU dry run does every stage and writes every table; a stage it cannot run fails it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args, timeout=600):
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": os.environ.get("PYTHON", __import__("sys").executable)})


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
