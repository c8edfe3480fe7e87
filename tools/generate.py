#!/usr/bin/env python
"""Generate text from a trained model, streaming tokens to stdout as they come.

    python tools/generate.py runs/cat/export.safetensors --prompt "def parse(" --max-new-tokens 200
    python tools/generate.py runs/cat_adaptive --prompt "import " --chunk-size 4 --temperature 0
    python tools/generate.py MODEL --prompts-file prompts.txt --batched --compile --device cuda

MODEL: an exported .safetensors file (tools/export.py), a checkpoint directory or a run
directory (its newest complete checkpoint); ``cat_titan.load_pretrained`` rebuilds it. The
tokenizer is the one the model was trained with (recorded in the file's metadata or the
checkpoint's meta.json); --tokenizer overrides it, with a warning on stderr when it is not the
recorded one.

Prompts: --prompt TEXT (repeatable) and/or --prompts-file FILE (one prompt per non-empty line;
'-' reads stdin). Each prompt starts with the end-of-text token, the document boundary the
model saw in training (--no-bos: not), so --prompt '' generates unconditionally.
Generation stops at end-of-text or after --max-new-tokens.

Output: each prompt's text (--no-echo: only the continuation) and its continuation, decoded
incrementally (a character split across tokens is printed once whole). Without --batched,
prompts run one after another and every token is printed as it is sampled; with --batched
they run as one batch (faster for many prompts) and each text is printed when the batch ends.
Several prompts are separated by '=== [i/n] ===' lines. Timing goes to stderr (--quiet: not).

Sampling: --temperature 0 is greedy; otherwise --top-k / --top-p filters and --seed make runs
reproducible. --chunk-size picks an adaptive CAT's chunk size (the test-time knob: smaller is
slower and better; a size the training curriculum never drew gets a warning). --compile
compiles the decode step (with CUDA graphs on CUDA).
Exit status: 0 done; 2 bad arguments, model file, tokenizer, chunk size or prompt length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_titan.data.tokenizer import TokenizerError, get_tokenizer  # noqa: E402
from cat_titan.decode_flags import add_decode_path_args, decode_path_error, lean_requested  # noqa: E402
from cat_titan.export import ExportError  # noqa: E402
from cat_titan.infer import generate, make_runner, stream  # noqa: E402
from cat_titan.infer.generate import runner_chunk_size  # noqa: E402
from cat_titan.infer.pretrained import DTYPES, load_model, resolve_dtype, trained_chunk_sizes  # noqa: E402
from cat_titan.infer.text import Detokenizer  # noqa: E402
from cat_titan.models.base import ModelInputError  # noqa: E402

EXIT_USAGE = 2


class UsageError(Exception):
    pass


def read_prompts(a) -> list[str]:
    prompts = list(a.prompt or [])
    if a.prompts_file:
        if a.prompts_file == "-":
            text = sys.stdin.read()
        else:
            path = Path(a.prompts_file)
            if not path.is_file():
                raise UsageError(f"--prompts-file {path}: no such file")
            text = path.read_text(encoding="utf-8")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompt given: use --prompt TEXT (repeatable; --prompt '' generates unconditionally) "
                         "or --prompts-file FILE")
    return prompts


def load_tokenizer(a, pre):
    spec = a.tokenizer or pre.tokenizer_spec
    if not spec:
        raise UsageError(f"{a.model} does not record its tokenizer; pass --tokenizer SPEC (e.g. byte, gpt2, "
                         f"path/to/ranks.tiktoken)")
    try:
        tok = get_tokenizer(spec)
    except TokenizerError as e:
        fix = ""
        if not a.tokenizer and spec.startswith("file:"):  # the rank file was moved or is on another machine
            fix = (f"; {a.model} was trained with that rank file: pass --tokenizer PATH to a copy of the same "
                   f"rank file")
        raise UsageError(f"tokenizer {spec!r}: {e}{fix}") from e
    # vocab_size, not padded_vocab_size: the padding rows were never trained (training refuses
    # data with ids >= vocab_size), and an end-of-text id among them could never stop a row.
    vocab = pre.model.args.vocab_size
    if tok.vocab_size > vocab:
        fix = (f"drop --tokenizer to use the one it was trained with ({pre.tokenizer_spec!r}, recorded in its metadata)"
               if a.tokenizer and pre.tokenizer_spec else
               "pass the tokenizer the model was trained with (--tokenizer; its run's meta.json records it)")
        raise UsageError(f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model's vocab_size is {vocab}: "
                         f"ids >= {vocab} would index untrained embedding rows; {fix}")
    # The data manifest's identity (recorded for byte, named and file tokenizers alike): another
    # tokenizer that fits the vocabulary runs without error but gives the ids other meanings.
    recorded = pre.tokenizer_info
    if recorded.get("sha256") and tok.sha256 != recorded["sha256"]:
        print(f"warning: tokenizer {tok.spec!r} ({tok.vocab_size} tokens, sha256 {tok.sha256[:12]}) is not the "
              f"one {a.model} was trained with ({recorded.get('spec')!r}, {recorded.get('vocab_size')} tokens, "
              f"sha256 {str(recorded['sha256'])[:12]}): token ids will stand for other text than in training; "
              f"pass that tokenizer (for a rank file: --tokenizer PATH to a copy of the same rank file)",
              file=sys.stderr)
    return tok


def encode_prompts(a, tok, prompts: list[str], block_size: int) -> list[list[int]]:
    ids = [([tok.eot_id] if a.bos else []) + tok.encode(p) for p in prompts]
    for i, (p, t) in enumerate(zip(prompts, ids)):
        if not t:
            raise UsageError(f"prompt {i + 1} is empty and --no-bos leaves no token to start from; drop --no-bos "
                             f"or give some text")
        if len(t) + a.max_new_tokens > block_size:
            short = p if len(p) <= 40 else p[:37] + "..."
            room = block_size - len(t)
            fix = (f"lower --max-new-tokens to at most {room}" if room > 0 else
                   f"shorten it below {block_size} tokens")
            raise UsageError(f"prompt {i + 1} ({short!r}) is {len(t)} tokens; with --max-new-tokens {a.max_new_tokens} "
                             f"the sequence would reach {len(t) + a.max_new_tokens} positions, beyond the model's "
                             f"block_size {block_size}; {fix}")
    return ids


def check_chunk_size(pre, chunk_size):
    model = pre.model
    try:
        C = runner_chunk_size(model, chunk_size)
    except ModelInputError as e:
        raise UsageError(f"--chunk-size: {e}") from e
    if model.args.kind == "cat_adaptive":
        try:
            trained = trained_chunk_sizes(pre)
        except ValueError:  # a recorded curriculum that no longer parses: nothing to compare with
            trained = [C]
        if C not in trained:  # valid for the weights, but the curriculum never drew it
            what = f"--chunk-size {C}" if chunk_size is not None else f"chunk size {C} (the default, the largest)"
            print(f"warning: {what} was never used in training: the curriculum drew only {trained}; "
                  f"output at an untrained size may be poor, pass --chunk-size with one of those",
                  file=sys.stderr)
    return C


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="exported .safetensors file, checkpoint directory or run directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per non-empty line ('-': stdin)")
    p.add_argument("--tokenizer", help="tokenizer spec overriding the model's (byte, gpt2, FILE.tiktoken, ...)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=None, help="adaptive CATs: chunk size (default: the largest)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "stored", *DTYPES],
                   help="auto: bf16 on CUDA, fp32 elsewhere; stored: the file's dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on CUDA)")
    add_decode_path_args(p)
    p.add_argument("--batched", action="store_true", help="all prompts in one batch; print each text at the end")
    p.add_argument("--no-bos", dest="bos", action="store_false", help="don't start prompts with end-of-text")
    p.add_argument("--no-echo", dest="echo", action="store_false", help="print only the generated text")
    p.add_argument("--quiet", action="store_true", help="no timing on stderr")
    a = p.parse_args(argv)
    try:
        return run(a)
    except (UsageError, ExportError, ModelInputError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def run(a) -> int:
    bad = decode_path_error(a.lean, a.fold_norms)
    if bad:
        raise UsageError(bad)
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {a.max_new_tokens} must be >= 1")
    prompts = read_prompts(a)
    try:
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but CUDA is not available; use --device cpu")
        from cat_titan.infer.sampling import SamplingParams

        SamplingParams(a.temperature, a.top_k, a.top_p).validate()
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    pre = load_model(a.model, device=device, dtype=resolve_dtype(a.dtype, device))
    model = pre.model
    tok = load_tokenizer(a, pre)
    C = check_chunk_size(pre, a.chunk_size)
    ids = encode_prompts(a, tok, prompts, model.args.block_size)
    vocab = tok.vocab_size  # <= the model's (load_tokenizer); larger ids could not be decoded
    eos = tok.eot_id
    gen = torch.Generator(device=device).manual_seed(a.seed)
    kw = dict(chunk_size=a.chunk_size, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_id=eos,
              generator=gen, vocab_size=vocab)
    batch = len(ids) if a.batched else 1
    runner = make_runner(model, batch, max(map(len, ids)) + a.max_new_tokens, C)
    if lean_requested(a.lean, a.fold_norms):
        runner.lean_linears(fold_norms=a.fold_norms)
    if a.compile:
        runner.compile_step(mode="reduce-overhead" if device.type == "cuda" else None, lean=a.lean)
    out = sys.stdout
    many = len(prompts) > 1
    t0, produced = time.perf_counter(), 0

    def header(i: int) -> None:
        if many:
            out.write(("\n" if i else "") + f"=== [{i + 1}/{len(prompts)}] ===\n")

    if a.batched:
        rows = generate(model, ids, a.max_new_tokens, runner=runner, **kw)
        for i, (text, row) in enumerate(zip(prompts, rows)):
            header(i)
            produced += len(row)
            body = Detokenizer(tok).decode(t for t in row if t != eos)
            out.write((text if a.echo else "") + body + "\n")
    else:
        for i, (text, row_ids) in enumerate(zip(prompts, ids)):
            header(i)
            if a.echo:
                out.write(text)
            out.flush()
            detok = Detokenizer(tok)
            for step in stream(model, [row_ids], a.max_new_tokens, runner=runner, **kw):
                t = int(step.tokens[0])  # one device sync per token: the text is printed as it comes
                produced += 1
                if t != eos:
                    out.write(detok.push(t))
                    out.flush()
            out.write(detok.flush() + "\n")
            out.flush()
    dt = time.perf_counter() - t0
    if not a.quiet:
        what = f"chunk size {C}, " if model.args.kind == "cat_adaptive" else ""
        print(f"[generate] {pre.label} ({model.args.kind}, {what}{str(next(model.parameters()).dtype)[6:]} on "
              f"{device.type}): {produced} tokens for {len(prompts)} prompt(s) in {dt:.2f}s "
              f"({produced / max(dt, 1e-9):.1f} tokens/s{', compile included' if a.compile else ''})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
