"""tools/bench_targets.py: the issues' speed targets, run as real benchmark processes (CPU smoke
presets here) and checked against their thresholds."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_targets as bt  # noqa: E402

TOOL = [sys.executable, str(ROOT / "tools" / "bench_targets.py")]


def run(args, tmp_path, timeout=600):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "CAT_TITAN_CACHE": str(tmp_path / "cache")}
    return subprocess.run(TOOL + args, capture_output=True, text=True, timeout=timeout, env=env)


def test_smoke_jobs_run_resume_and_report(tmp_path):
    out = tmp_path / "out"
    r = run(["--smoke", "--out", str(out), "--only", "train-cat-1,gen-64", "--repeat", "1"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"train-cat-1", "gen-64"}
    assert results["train-cat-1"]["result"]["tokens_per_sec_per_device"] > 0
    assert {row["chunk_size"] for row in results["gen-64"]["result"]["results"] if row["kind"] == "cat"} == {8, 32}
    verdicts = {row["target"]: row for row in json.loads((out / "targets.json").read_text())}
    cat = verdicts["train: reference-sized CAT, chunk 8, one GPU"]
    assert cat["value"] == results["train-cat-1"]["result"]["tokens_per_sec_per_device"]
    assert cat["verdict"] == "MISSED"  # a CPU against the H200 threshold
    gen8 = verdicts["generate: CAT chunk 8, batch 64 x 2048"]
    assert gen8["value"] > 0 and gen8["threshold"] == 98000
    assert verdicts["train: adaptive CAT, random curriculum"]["verdict"] == "not measured"
    assert "train-cat-1" in (out / "targets.md").read_text()
    log = (out / "log.txt").read_text()
    assert "===== gen-64: ok" in log

    # the same command again: the finished jobs are not rerun
    again = run(["--smoke", "--out", str(out), "--only", "train-cat-1,gen-64", "--repeat", "1"], tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("already in") == 2
    assert (out / "log.txt").read_text() == log


def test_unknown_job_is_refused_before_any_work(tmp_path):
    r = run(["--smoke", "--out", str(tmp_path / "out"), "--only", "train-cat,gen-64"], tmp_path, timeout=120)
    assert r.returncode == 2
    assert "unknown job(s) train-cat" in r.stderr and "train-cat-1" in r.stderr  # names the valid ones
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is not None,
                    reason="torchtitan is installed here: the missing-dependency refusal cannot run")
def test_missing_torchtitan_is_refused_before_any_work(tmp_path):
    r = run(["--out", str(tmp_path / "out")], tmp_path, timeout=120)
    assert r.returncode == 2 and "--no-anchor" in r.stderr and "pip install torchtitan" in r.stderr
    assert not (tmp_path / "out").exists()


def _train(tps, mfu=0.4, peak=20.0, **kw):
    return {"result": {"tokens_per_sec_per_device": tps, "mfu": mfu, "peak_mem_gb": peak, **kw}}


def _gen(*rows):
    return {"result": {"results": [dict(zip(("kind", "chunk_size", "tokens_per_s", "peak_mem_gib"), r)) for r in rows]}}


def test_verdicts_against_the_issue_thresholds():
    anchor = {"mfu_cat_titan_flops": 0.401, "tokens_per_sec_per_device": 154.9e3}
    results = {
        "train-cat-1": _train(150.0e3, mfu=0.426, anchor=anchor),
        "train-cat-2": _train(154.0e3),  # mean 152.0k >= 2 x 75.8k
        "train-dense-768": _train(450e3, anchor={**anchor, "tokens_per_sec_per_device": 400e3}),
        "train-dense-1536": _train(150e3, anchor=anchor),  # slower than torchtitan
        "train-fsdp": _train(0.949 * 152.0e3, peak=18.2),  # just under 95%
        "train-adaptive": _train(1.0, vs_fixed={"overhead": 0.049}),
        "gen-64": _gen(("dense", None, 60e3, 4.8), ("cat", 8, 97.9e3, 2.3), ("cat", 32, 141e3, 1.7)),
        "gen-320": _gen(("dense", None, 50e3, 45.5), ("cat", 32, 228e3, 5.05)),  # 4.56x speed, 9.01x memory
    }
    got = {r["target"]: (r["verdict"], r["value"]) for r in bt.evaluate(results)}
    assert got["train: reference-sized CAT, chunk 8, one GPU"] == ("met", 152.0e3)
    assert got["train: CAT MFU vs torchtitan Llama3 at the decoder's size (one formula)"] == ("met", 0.426)
    assert got["train: dense 768x12 vs torchtitan Llama3"][0] == "met"
    assert got["train: dense 1536x12 vs torchtitan Llama3"][0] == "MISSED"
    assert got["train: FSDP on 2 GPUs, per-GPU throughput"][0] == "MISSED"
    assert got["train: FSDP on 2 GPUs, peak memory per GPU"] == ("met", 18.2)
    assert got["train: adaptive CAT, random curriculum"] == ("met", 0.049)
    assert got["generate: CAT chunk 8, batch 64 x 2048"] == ("MISSED", 97.9e3)
    assert got["generate: CAT chunk 32, batch 64 x 2048"] == ("met", 141e3)
    speed = got["generate: CAT-32 vs dense, batch 320 x 4096, speed"]
    assert speed[0] == "met" and speed[1] == pytest.approx(228 / 50)
    memory = got["generate: CAT-32 vs dense, batch 320 x 4096, peak memory"]
    assert memory[0] == "met" and memory[1] == pytest.approx(45.5 / 5.05)
    # a failed job counts as not measured, never as met
    results["gen-320"] = {"error": "exit status 1; see log.txt"}
    got = {r["target"]: r["verdict"] for r in bt.evaluate(results)}
    assert got["generate: CAT-32 vs dense, batch 320 x 4096, speed"] == "not measured"


def test_report_merges_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "results.json").write_text(json.dumps({"train-cat-1": {**_train(150e3), "command": "x", "seconds": 1}}))
    (b / "results.json").write_text(json.dumps({"train-cat-2": {**_train(154e3), "command": "y", "seconds": 2}}))
    assert bt.main(["--report", str(a), str(b), "--out", str(tmp_path / "r")]) == 0
    rows = {r["target"]: r for r in json.loads((tmp_path / "r" / "targets.json").read_text())}
    assert rows["train: reference-sized CAT, chunk 8, one GPU"]["value"] == 152e3
    with pytest.raises(SystemExit, match="does not exist"):
        bt.main(["--report", str(tmp_path / "missing")])


def test_lean_blocks_reach_the_generation_jobs_only(tmp_path, capsys):
    """--lean, --no-lean and --fold-norms go to both generation jobs (no flag: bench_generate's
    default); --fold-norms with --no-lean is refused before any work."""
    for flags in (["--lean", "--fold-norms"], ["--no-lean"], ["--fold-norms"]):
        assert bt.main(["--list", "--no-anchor", *flags]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert {line.split()[0] for line in lines if " ".join(flags) in line} == {"gen-64", "gen-320"}, lines
    assert bt.main(["--list", "--no-anchor"]) == 0
    assert "lean" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bt.main(["--out", str(tmp_path / "out"), "--no-anchor", "--fold-norms", "--no-lean"])
    assert e.value.code == 2 and "drop --no-lean" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
