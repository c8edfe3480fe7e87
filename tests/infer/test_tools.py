"""The inference tools end to end on CPU: tools/study.py --smoke trains (train.py), exports and
evaluates three tiny models once per module; tools/generate.py and tools/evaluate.py then run
on those exported files. CLIs run in-process through their main() (subprocess start-up costs
seconds), except one real subprocess per tool."""

import base64
import csv
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cat_titan.data.tokenizer import get_tokenizer
from cat_titan.infer import generate
from cat_titan.infer.pretrained import load_model
from cat_titan.infer.text import Detokenizer

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "study.py"), "--out", str(out), "--smoke",
                           "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _png_ok(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_study_smoke_writes_the_report(study):
    md = (study / "study.md").read_text()
    for piece in ("## Setup", "## Quality and cost per chunk size", "study_loss_curves.png",
                  "study_quality_vs_cost.png", "| cat_adaptive | cat_adaptive | 4 |"):
        assert piece in md, piece
    for png in ("study_loss_curves.png", "study_quality_vs_cost.png"):
        _png_ok(study / png)
    rows = list(csv.DictReader(open(study / "eval.csv")))
    assert [(r["model"], r["chunk_size"]) for r in rows] == [("dense", ""), ("cat", "8"), ("cat_adaptive", "2"),
                                                             ("cat_adaptive", "4"), ("cat_adaptive", "8")]
    results = json.loads((study / "results.json").read_text())
    for name in ("dense", "cat", "cat_adaptive"):
        t = results["train"][name]
        assert t["step"] == 3 and t["exit"] == 0
        # the evaluation's loss is the trainer's final val_loss (same data, seq_len, batches)
        metrics = [json.loads(x) for x in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        final = [m for m in metrics if m.get("eval")][-1]
        for r in results["eval"][name]:
            key = f"val_loss_chunk{r['chunk_size']}" if name == "cat_adaptive" else "val_loss"
            assert abs(r["val_loss"] - final[key]) < 1e-5, (name, r["chunk_size"], r["val_loss"], final)
            assert r["tokens_per_s"] > 0 and r["state_mem_gib"] > 0
    # a second run reuses everything (runs, exports, evaluations)
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "study.py"), "--out", str(study), "--smoke",
                            "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("skipped") == 9, again.stdout
    # a report drawn into a fresh directory from the work directory alone (how models trained by
    # separate invocations, e.g. one per GPU, are reported together) keeps the setup and timings
    fresh = study / "fresh"
    rep = subprocess.run([sys.executable, str(ROOT / "tools" / "study.py"), "--out", str(fresh), "--work",
                          str(study / "work"), "--smoke", "--device", "cpu", "--phases", "report"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    md2 = (fresh / "study.md").read_text()
    assert f"Same data (`{results['data']}`)" in md2 and "training.steps=3" in md2
    for name in ("dense", "cat", "cat_adaptive"):
        assert f"| train {name} | " in md2 and f"| eval {name} | " in md2
    assert md2.split("## Quality")[1].split("## Timings")[0] == md.split("## Quality")[1].split("## Timings")[0]


def _expected_stream(path, prompts, n, chunk, seed, temperature, top_k):
    pre = load_model(path)
    tok = get_tokenizer(pre.tokenizer_spec)
    vocab = min(tok.vocab_size, pre.model.args.vocab_size)
    g = torch.Generator().manual_seed(seed)
    texts = []
    for p in prompts:
        ids = [tok.eot_id] + tok.encode(p)
        row = generate(pre.model, [ids], n, chunk_size=chunk, temperature=temperature, top_k=top_k, eos_id=tok.eot_id,
                       generator=g, vocab_size=vocab)[0]
        texts.append(p + tok.decode([t for t in row if t != tok.eot_id]))
    return texts


def test_generate_streams_what_generate_returns(study, capsys):
    path = study / "work" / "exports" / "cat_adaptive.safetensors"
    prompts = ["def main(", "naïve café → ok"]  # multi-byte characters: split across byte tokens
    argv = [str(path), "--max-new-tokens", "40", "--chunk-size", "4", "--temperature", "1.0", "--top-k", "50",
            "--seed", "3", "--quiet"]
    for p in prompts:
        argv += ["--prompt", p]
    assert _tool("generate").main(argv) == 0
    out = capsys.readouterr().out
    want = _expected_stream(path, prompts, 40, 4, 3, 1.0, 50)
    assert out == "".join(("\n" if i else "") + f"=== [{i + 1}/2] ===\n{t}\n" for i, t in enumerate(want))
    assert "\ufffd" not in want[1][:len(prompts[1])]

    # --batched: one batch, the texts of generate() on all prompts at once
    assert _tool("generate").main(argv + ["--batched", "--no-echo"]) == 0
    out = capsys.readouterr().out
    pre = load_model(path)
    tok = get_tokenizer("byte")
    rows = generate(pre.model, [[tok.eot_id] + tok.encode(p) for p in prompts], 40, chunk_size=4, temperature=1.0,
                    top_k=50, eos_id=tok.eot_id, generator=torch.Generator().manual_seed(3), vocab_size=257)
    texts = [tok.decode([t for t in r if t != tok.eot_id]) for r in rows]
    assert out == "".join(("\n" if i else "") + f"=== [{i + 1}/2] ===\n{t}\n" for i, t in enumerate(texts))

    # --lean (the lean decode blocks, their reference ops on CPU), with folded norms, and
    # --no-lean: the same texts
    for flags in (["--lean"], ["--fold-norms"], ["--no-lean"]):
        assert _tool("generate").main(argv + ["--batched", "--no-echo", *flags]) == 0, flags
        assert capsys.readouterr().out == out, flags


def test_generate_cli_subprocess_and_errors(study, capsys, tmp_path):
    path = study / "work" / "exports" / "cat.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), str(path), "--prompts-file", "-",
                           "--max-new-tokens", "12", "--temperature", "0"], input="import os\n\nclass A:\n",
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    want = _expected_stream(path, ["import os", "class A:"], 12, None, 0, 0.0, None)
    assert proc.stdout == f"=== [1/2] ===\n{want[0]}\n\n=== [2/2] ===\n{want[1]}\n"
    assert "tokens/s" in proc.stderr

    # a tokenizer with more tokens (300) than the model was trained on (257): its end-of-text id 299
    # would be an untrained padding row, and stopping at end-of-text would be off
    big = tmp_path / "big.tiktoken"
    ranks = [bytes([i]) for i in range(256)] + [bytes([97 + i % 26, 97 + i // 26]) for i in range(43)]
    big.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    assert get_tokenizer(str(big)).vocab_size == 300

    gen = _tool("generate")
    cases = [
        ([str(tmp_path / "missing.safetensors"), "--prompt", "x"], "no such file"),
        ([str(study / "work" / "exports" / "cat_adaptive.safetensors"), "--prompt", "x", "--chunk-size", "3"],
         "valid chunk sizes: [1, 2, 4, 8]"),
        ([str(path), "--prompt", "x", "--chunk-size", "4"], "chunk_size=4"),
        ([str(path), "--prompt", "y" * 250, "--max-new-tokens", "10"], "block_size 256"),
        ([str(path)], "no prompt given"),
        ([str(path), "--prompt", "x", "--tokenizer", "nope"], "unknown tokenizer spec"),
        ([str(path), "--prompt", "x", "--fold-norms", "--no-lean"], "drop --no-lean"),
        ([str(path), "--prompt", "x", "--max-new-tokens", "5", "--tokenizer", str(big)],
         "has 300 tokens but the model's vocab_size is 257"),
    ]
    for argv, message in cases:
        assert gen.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_evaluate_cli_writes_csv_json_png(study, tmp_path, capsys):
    ex = study / "work" / "exports"
    out = tmp_path / "eval"
    argv = [str(ex / "cat_adaptive.safetensors"), str(study / "work" / "runs" / "cat"), "--baseline",
            str(ex / "dense.safetensors"), "--max-batches", "1", "--gen-batch", "2", "--gen-len", "12", "--out",
            str(out), "--device", "cpu"]
    assert _tool("evaluate").main(argv) == 0
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert [(r["model"], r["role"], r["chunk_size"]) for r in rows] == [
        ("cat_adaptive", "model", "2"), ("cat_adaptive", "model", "4"), ("cat_adaptive", "model", "8"),
        ("cat", "model", "8"), ("dense", "baseline", "")]
    study_rows = {(r["model"], r["chunk_size"]): float(r["val_loss"]) for r in csv.DictReader(open(study / "eval.csv"))}
    for r in rows:
        loss = float(r["val_loss"])
        assert math.isfinite(loss) and 0 < loss < 10
        assert abs(math.exp(loss) - float(r["val_ppl"])) < 1e-3 * float(r["val_ppl"])
        assert float(r["tokens_per_s"]) > 0 and int(r["gen_len"]) == 12 and int(r["cache_columns"]) > 0
        assert abs(loss - study_rows[(r["model"], r["chunk_size"])]) < 1e-5  # same data and batches as the study
    data = json.loads((out / "eval.json").read_text())
    assert len(data["rows"]) == 5 and data["rows"][0]["peak_mem_kind"] == "process peak RSS"
    _png_ok(out / "eval.png")
    assert "cat_adaptive" in capsys.readouterr().out

    ev = _tool("evaluate")
    assert ev.main([str(ex / "cat_adaptive.safetensors"), "--chunk-sizes", "3", "--out", str(out), "--no-speed"]) == 2
    assert "valid: [1, 2, 4, 8]" in capsys.readouterr().err
    assert ev.main([str(ex / "cat.safetensors"), "--data", str(tmp_path / "nodata"), "--out", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_evaluate_tells_models_with_equal_file_names_apart(study, tmp_path, capsys):
    """Exports all named model.safetensors (as the README's export example writes them) were all
    labelled "model", and the plot joined the fixed CAT's point to the adaptive CAT's line."""
    import shutil

    from cat_titan.infer.plots import plot_series

    ex = study / "work" / "exports"
    paths = {}
    for name in ("cat_adaptive", "cat", "dense"):
        paths[name] = tmp_path / "runs" / name / "model.safetensors"
        paths[name].parent.mkdir(parents=True)
        shutil.copy(ex / f"{name}.safetensors", paths[name])
    base = [str(paths["cat_adaptive"]), str(paths["cat"]), "--baseline", str(paths["dense"]), "--max-batches", "1",
            "--no-speed", "--device", "cpu"]
    ev = _tool("evaluate")
    for extra, want in (([], ["cat_adaptive/model"] * 3 + ["cat/model", "dense/model"]),
                        (["--labels", "same,same"], ["same"] * 4 + ["dense/model"])):  # equal by request
        out = tmp_path / ("eval" + "".join(extra))
        assert ev.main(base + extra + ["--out", str(out)]) == 0
        rows = json.loads((out / "eval.json").read_text())["rows"]
        assert [r["model"] for r in rows] == want, capsys.readouterr().out
        # one line per input, whatever the labels
        assert [[(r["kind"], r["chunk_size"]) for r in s] for s in plot_series(rows)] == [
            [("cat_adaptive", 2), ("cat_adaptive", 4), ("cat_adaptive", 8)], [("cat", 8)], [("dense", None)]]
        _png_ok(out / "eval.png")
    capsys.readouterr()


def _rank_file(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def test_generate_warns_about_a_tokenizer_other_than_the_trained_one(study, tmp_path, capsys):
    path = study / "work" / "exports" / "cat.safetensors"  # trained with "byte" (257 tokens)
    # the byte tokenizer's ranks in a file: another spec, the same identity
    same = _rank_file(tmp_path / "bytes.tiktoken", [bytes([i]) for i in range(256)])
    # 257 tokens too, so it fits the vocabulary, but every id stands for another byte
    other = _rank_file(tmp_path / "reversed.tiktoken", [bytes([255 - i]) for i in range(256)])
    gen = _tool("generate")
    argv = [str(path), "--prompt", "x", "--max-new-tokens", "3", "--quiet", "--tokenizer"]
    assert gen.main(argv + [str(same)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert gen.main(argv + [str(other)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: tokenizer") and f"file:{other}" in err and "'byte'" in err, err


def test_generate_says_how_to_replace_a_moved_rank_file(tmp_path, capsys):
    ranks = _rank_file(tmp_path / "ranks.tiktoken", [bytes([i]) for i in range(256)] + [b"  ", b"e ", b"th"])
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "debug_cat.yaml"),
                           f"job.run_dir={run_dir}", "training.steps=2", "data.seq_len=64", "training.global_batch=2",
                           "training.micro_batch=2", f"data.tokenizer={ranks}", "data.corpus_max_bytes=100000",
                           "model.vocab_size=260", "training.sample_tokens=0"], capture_output=True, text=True,
                          env={**ENV, "CAT_TITAN_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    copy = ranks.rename(tmp_path / "copy.tiktoken")  # the recorded path is gone
    gen = _tool("generate")
    argv = [str(run_dir), "--prompt", "x", "--max-new-tokens", "3", "--quiet"]
    assert gen.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{ranks} " in err and "pass --tokenizer PATH to a copy of the same rank file" in err, err
    assert gen.main(argv + ["--tokenizer", str(copy)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_generate_warns_about_a_chunk_size_training_never_drew(study, capsys):
    path = study / "work" / "exports" / "cat_adaptive.safetensors"  # valid 1, 2, 4, 8; trained 2, 4, 8
    gen = _tool("generate")
    argv = [str(path), "--prompt", "x", "--max-new-tokens", "3", "--quiet", "--chunk-size"]
    assert gen.main(argv + ["1"]) == 0
    err = capsys.readouterr().err
    assert "warning: --chunk-size 1 was never used in training" in err and "[2, 4, 8]" in err, err
    assert gen.main(argv + ["2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_detokenizer_handles_split_characters():
    tok = get_tokenizer("byte")
    text = "añ€😀 ok"
    ids = tok.encode(text)
    detok = Detokenizer(tok)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) + detok.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces[ids.index(0xF0) + 1] == ""  # mid-character: nothing yet
    g = torch.Generator().manual_seed(0)
    junk = torch.randint(0, 256, (500,), generator=g).tolist()  # invalid UTF-8 in places
    assert Detokenizer(tok).decode(junk) == tok.decode(junk)


def test_bench_generate_profile(tmp_path):
    prof = tmp_path / "prof"
    bench = _tool("bench_generate")
    assert bench.main(["--cat-preset", "debug-cat", "--dense-preset", "debug-dense", "--chunk-sizes", "8",
                       "--batch", "2", "--prompt-len", "5", "--gen-len", "10", "--device", "cpu", "--dtype", "fp32",
                       "--profile", str(prof), "--profile-steps", "6", "--json", str(tmp_path / "b.json")]) == 0
    summary = (prof / "summary.md").read_text()
    assert "| dense |" in summary and "| cat C=8 |" in summary
    for label in ("dense", "cat_C=8"):
        top = (prof / f"{label}.top.md").read_text()
        assert "aten::mm" in top and "calls per step" in top
        trace = json.loads(gzip.decompress((prof / f"{label}.trace.json.gz").read_bytes()))
        assert trace["traceEvents"]
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert all(r["profile"]["kernels_per_step"] > 0 for r in rows)


def test_study_refuses_bad_counts_instead_of_replacing_them(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("tool_study", ROOT / "tools" / "study.py")
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tool_study", study)  # its dataclass looks its module up
    spec.loader.exec_module(study)
    base = ["--out", str(tmp_path / "o"), "--smoke", "--device", "cpu"]
    a = study.parse_args(base)  # left out: the smoke defaults
    assert (a.steps, a.global_batch, a.micro_batch, a.eval_batches, a.gen_batch) == (3, 8, 8, 1, 2)
    assert study.parse_args(base + ["--steps", "7", "--warmup-steps", "0"]).steps == 7
    # an explicit 0 was silently the default (--steps 0 trained 300 steps on a GPU preset)
    for extra, named in ((["--steps", "0"], "--steps 0"), (["--eval-batches", "0"], "--eval-batches 0"),
                         (["--gen-batch", "0", "--global-batch", "0"], "--global-batch 0, --gen-batch 0"),
                         (["--micro-batch", "0"], "--micro-batch 0"), (["--minutes", "-1"], "--minutes -1.0"),
                         (["--global-batch", "12"], "--global-batch 12 is not a multiple of --micro-batch 8")):
        with pytest.raises(SystemExit) as e:
            study.parse_args(base + extra)
        assert e.value.code == 2 and named in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_bad_loss_options_before_loading(tmp_path, capsys):
    # --max-batches -1 evaluated no batch and wrote NaN losses; --seq-len 0 used the run's.
    # The model does not exist: the options are checked before it would load.
    out = tmp_path / "eval"
    argv = [str(tmp_path / "missing.safetensors"), "--max-batches", "-1", "--seq-len", "0", "--batch-size", "0",
            "--out", str(out)]
    assert _tool("evaluate").main(argv) == 2
    err = capsys.readouterr().err
    for named in ("--max-batches -1", "--seq-len 0", "--batch-size 0"):
        assert named in err, err
    assert not out.exists()
