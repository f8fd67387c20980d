"""The benchmark scripts run at tiny sizes and produce their tables (not the numbers).

Multi-process tests use 2 local Gloo ranks; total well under two minutes on 2 cores.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
sys.path.insert(0, ROOT)

HAS_SK = importlib.util.find_spec("sklearn") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_text_data_is_real_and_held_out():
    from convergence.data import load_text, lm_batch
    tr, va, info = load_text(200_000, 20_000)
    assert tr.numel() == 200_000 and va.numel() == 20_000
    assert b"def " in bytes(tr[:50_000].tolist())
    b = lm_batch(tr, 3, 16, torch.Generator().manual_seed(0))
    assert b.shape == (3, 16) and b.dtype == torch.long


def test_lm_models_forward_and_fallback():
    from convergence.models import make_lm
    ids = torch.randint(0, 256, (2, 16))
    for fb in (False, True):
        m, kind = make_lm("tiny", seq=16, force_fallback=fb)
        loss = m(ids)
        loss.backward()
        assert torch.isfinite(loss) and kind
    assert "fallback" in make_lm("tiny", force_fallback=True)[1]


def test_powersgd_byte_rule_matches_hand_count():
    from convergence.methods import powersgd_step_bytes
    ps = [torch.zeros(64, 32), torch.zeros(64), torch.zeros(16, 8, 3, 3), torch.zeros(4, 4)]
    # 64x32 r=4: 64*32=2048 > (96)*4*2=768 -> (64+32)*4 floats; bias dense 64;
    # conv 16x72: 1152 > 88*4*2=704 -> 88*4; 4x4 r=4: 16 > 8*4*2? no -> dense 16
    assert powersgd_step_bytes(ps, 4) == 4 * (96 * 4 + 64 + 88 * 4 + 16)


def _lore_bytes_counted(rank, world, lore_rank):
    import lorecomm
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16 * 36, 40),
                                torch.nn.Linear(40, 6))
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = lorecomm.register(ddp, rank=lore_rank, explore=0.0, start_step=2, auto_dense=False)
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        ddp(torch.randn(4, 3, 8, 8, generator=g)).square().mean().backward()
    st = state.stats()
    return st["bytes_by_phase"]["compressed"] / st["steps_by_phase"]["compressed"], list(model.parameters())


def test_lore_byte_rule_matches_what_the_engine_sends():
    from convergence.methods import lore_rank_within, lore_step_bytes, powersgd_step_bytes
    from distributed import run_ranks
    for r in (3, 40):  # 40: the conv (16 x 27) and the head (6 x 40) go dense in bf16
        (sent, params), _ = run_ranks(_lore_bytes_counted, 2, r)
        assert sent == lore_step_bytes(params, r, explore=False), (r, sent)
    # Lore at a PowerSGD budget: the largest rank that fits
    budget = powersgd_step_bytes(params, 4)
    k = lore_rank_within(params, budget)
    assert lore_step_bytes(params, k) <= budget < lore_step_bytes(params, k + 1), k
    with pytest.raises(ValueError, match="over the budget"):
        lore_rank_within(params, 10)


def test_compare_main_job_tiny():
    out_prefix = os.path.join(BENCH, "results", "tmp", "test_compare")
    out = _run(["bench/compare.py", "--steps", "6", "--preset", "tiny", "--seq", "16", "--batch", "2",
                "--out", out_prefix, "--no-progress"])
    for word in ("train loss", "val loss", "bytes/step", "compression", "time/step", "dense", "powersgd",
                 "lore", "greedylore", "single DDP bucket"):
        assert word in out, out
    assert os.path.exists(out_prefix + ".json")
    if HAS_MPL:
        assert os.path.exists(out_prefix + ".png")


def test_compare_help_documents_options():
    out = _run(["bench/compare.py", "--help"])
    for opt in ("--steps", "--methods", "--world-size", "--out"):
        assert opt in out


@pytest.mark.parametrize("args, needle", [
    (["bench/compare.py", "--methods", "dense,lorre"], "--methods: unknown method(s) lorre; choose from dense"),
    (["bench/compare.py", "--preset", "huge"], "--preset: unknown preset 'huge'; choose from tiny"),
    (["bench/convergence/run_all.py", "--only", "lmm", "--out", "{tmp}"], "--only: unknown workload(s) lmm"),
])
def test_bench_refuses_unknown_names_before_training(tmp_path, args, needle):
    args = [a.format(tmp=tmp_path / "out") for a in args]
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and needle in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.skipif(not HAS_SK, reason="digits workloads need scikit-learn (bench extra)")
def test_run_all_quick_writes_report(tmp_path):
    _run(["bench/convergence/run_all.py", "--quick", "--no-progress", "--out", str(tmp_path)])
    md = (tmp_path / "convergence_quick.md").read_text()
    for s in ("Language model", "Residual CNN", "Fine-tuning", "Noisy quadratics", "Linear speedup", "## Claims",
              "energy kept by greedy top-r", "effective dimension tr(H)/lambda_max",
              "| run |", "bytes/step", "compression", "val acc", "iters to target", "steps to target",
              "python bench/convergence/run_all.py --quick"):
        assert s in md, s
    assert ("confirmed" in md) or ("NOT confirmed" in md)
    # the new evidence: simulated PowerSGD in the quadratics and the speedup study, fine-tuning under sgdm
    assert "| lowrank | powersgd |" in md and "| powersgd | 1 |" in md, md
    assert "| dense/sgdm |" in md.split("## 3. Fine-tuning")[1].split("## 4.")[0]
    assert "greedy-noef/sgdm" in md and "fine-tune sgdm" in md
    assert "(extra row: vs PowerSGD only" in md
    # issue 11: Lore in the sections, the loss-vs-bytes frontier over budgets, the LM over seeds, the claim
    assert "| lore/adamw |" in md.split("## 1.")[1].split("## 2.")[0]
    front = md.split("## 7. Loss vs bytes")[1].split("## 8.")[0]
    assert "| lm | adamw | powersgd | 2 |" in front and "| digits | sgdm | lore | 4 |" in front, front
    assert "## 8. The LM at PowerSGD r = 4 bytes over seeds" in md
    assert "### Lore (lorecomm's default) is on or beyond torch PowerSGD's loss-vs-bytes frontier" in md
    assert "| randk/sgdm |" in md.split("## 1.")[1].split("## 2.")[0]  # LM under momentum SGD
    quad = md.split("## 4.")[1].split("## 5.")[0]
    assert "Under momentum SGD" in quad and "| lowrank | greedylore/adamw |" in quad
    if HAS_MPL:
        for f in ("lm", "digits", "ft", "frontier", "quadratics", "speedup"):
            assert (tmp_path / f"convergence_quick_{f}.png").exists()
    # the report re-renders from the saved raw results, identically
    again = _run(["bench/convergence/run_all.py", "--quick", "--report-only", "--out", str(tmp_path)])
    assert again.strip() == md.strip()


def test_resume_reuses_only_a_raw_file_of_exactly_the_requested_runs_from_the_same_environment(tmp_path):
    import json

    from convergence.ddp_runner import environment
    from convergence.run_all import reusable
    env = environment()
    spec = dict(task="lm", preset="base", seq=64, batch=8, desc="LM")
    runs = [dict(method="dense", opt="adamw", steps=10, rank=8), dict(method="lore", opt="adamw", steps=10, rank=8)]
    saved = dict(spec=spec, world_size=2, environment=env, runs=[dict(r, losses=[1.0, 0.5]) for r in runs])
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(saved))
    assert reusable(str(path), spec, runs, 2, env)["runs"][1]["losses"] == [1.0, 0.5]
    assert reusable(str(path), spec, runs, 4, env) is None  # other world size
    assert reusable(str(path), dict(spec, seq=128), runs, 2, env) is None  # other spec
    assert reusable(str(path), spec, runs[:1], 2, env) is None  # an interrupted or different list
    assert reusable(str(path), spec, [runs[0], dict(runs[1], rank=4)], 2, env) is None  # one setting changed
    assert reusable(str(path), spec, runs, 2, dict(env, code="0" * 16)) is None  # other code
    assert reusable(str(path), spec, runs, 2, dict(env, torch="2.0.0")) is None  # other library
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "environment"}))
    assert reusable(str(path), spec, runs, 2, env) is None  # written before environments were recorded
    assert reusable(str(tmp_path / "missing.json"), spec, runs, 2, env) is None
    path.write_text("{ truncated")
    assert reusable(str(path), spec, runs, 2, env) is None


def test_environment_changes_with_the_code_it_hashes(tmp_path, monkeypatch):
    """The fingerprint covers lorecomm's sources: a package with one changed file hashes differently."""
    import shutil

    import lorecomm
    from convergence import ddp_runner
    pkg = os.path.dirname(lorecomm.__file__)
    a = ddp_runner.environment()
    assert a == ddp_runner.environment()  # deterministic
    copy = tmp_path / "lorecomm"
    shutil.copytree(pkg, copy)
    monkeypatch.setattr(lorecomm, "__file__", str(copy / "__init__.py"))
    assert ddp_runner.environment() == a  # the same files elsewhere: the same code
    with open(copy / "lore.py", "a") as fh:
        fh.write("\n# changed\n")
    b = ddp_runner.environment()
    assert b["code"] != a["code"] and {k: v for k, v in b.items() if k != "code"} == \
        {k: v for k, v in a.items() if k != "code"}


def test_replicates_parses_methods_and_names_the_bad_part(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(BENCH, "research"))
    from replicates import parse_method
    assert parse_method("lore:rank=8:lore_rank=16:wire=float32:explore=0") == \
        dict(method="lore", rank=8, lore_rank=16, wire="float32", explore=0.0)
    assert parse_method("powersgd:rank=4") == dict(method="powersgd", rank=4)
    for bad, says in (("sgd:rank=2", "unknown method 'sgd'"), ("lore:rk=2", "'rk=2'"),
                      ("lore:rank", "'rank'"), ("lore:wire=fp8", "wire='fp8'")):
        with pytest.raises(SystemExit, match=says):
            parse_method(bad)
