"""The training loop: config -> mesh -> model on meta -> parallelize -> init or resume ->
loop { batch -> chunk size -> forward/backward (accumulated) -> clip -> step -> schedule ->
metrics -> eval -> checkpoint } -> final checkpoint -> sample.

Exit status (documented for launch scripts): 0 finished; 2 bad configuration, run
directory or checkpoint (nothing was written), or the run directory held by another job
(``job.lease_timeout_s``; also when it is taken over mid-run: stopped without saving); 75
(EX_TEMPFAIL) stopped by SIGTERM or SIGUSR1 after saving a complete checkpoint (requeue:
``checkpoint.resume=auto`` continues from it); anything else is a crash.

Preemption: a SIGTERM/SIGUSR1 on any rank sets a flag; at the end of the current step the
ranks agree on it (an all-reduce every step, so a signal that reached only one rank
stops all of them), save step N synchronously and exit 75. Signals during the save only set
the flag again, they do not interrupt it. A signal that arrives after the last step lets the
run finish normally (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .. import confutil
from ..config import Config, load_config, save_config
from ..confutil import ConfigError, write_atomic
from ..models.registry import build_model, flops_per_token
from ..parallel.mesh import ParallelDims, build_parallel_dims
from ..parallel.parallelize import (clip_divisor, clip_grad_norm_, compiled_graphs, grad_norm, loss_parallel_context,
                                    param_groups, parallelize, refuse_unsupported)
from .checkpoint import (Checkpointer, CheckpointError, ModelOptim, TrainState, check_model_matches,
                         history_origin, load_model_weights, read_meta, resolve_resume, shape_differences)
from .curriculum import build_curriculum
from .lease import LEASE_NAME, LeaseError, RunLease
from .metrics import MetricsLogger, mfu, peak_flops

# 3: stopped on a non-finite loss or gradient norm (training.nonfinite=stop). Not a crash to
# retry: a requeued job resumes from the checkpoint before it and meets the same divergence.
EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 2, 3, 75


class NonFiniteError(RuntimeError):
    pass


class LeaseLost(RuntimeError):
    """Another job took the run directory over (see lease.py): stop without saving, exit 2."""


def lr_lambda(cfg: Config):
    s, total = cfg.schedule, cfg.training.steps

    def f(step: int) -> float:  # step: number of optimizer steps taken so far
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.kind == "constant":
            return 1.0
        if s.kind == "cosine":
            progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total - int(s.decay_fraction * total)  # wsd
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1.0 - s.min_lr_ratio) * progress

    return f


class GcSchedule:
    """Python's garbage collector on a schedule: inside ``with``, automatic collection is off
    and ``maybe_collect(step)`` collects the young generations every ``interval`` steps, so no
    collection lands in the middle of a step while the GPU waits for the host. Leaving the
    block collects everything and restores the automatic collector. interval 0: untouched."""

    def __init__(self, interval: int):
        self.interval = interval
        self._restore = False

    def __enter__(self) -> "GcSchedule":
        if self.interval > 0 and gc.isenabled():
            gc.disable()
            self._restore = True
        return self

    def maybe_collect(self, step: int) -> None:
        if self.interval > 0 and step % self.interval == 0:
            gc.collect(1)

    def __exit__(self, *exc) -> None:
        if self._restore:
            gc.collect()
            gc.enable()
            self._restore = False


class Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop agrees on it across ranks at step boundaries
    (``Trainer._agree``). A second signal only sets the flag again: a save in progress is
    never interrupted. ``close`` puts back the handlers that were installed before."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if not self.requested:
            print(f"[preemption] received {signal.Signals(signum).name}: saving at the end of this step",
                  file=sys.stderr, flush=True)
        self.requested = True

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.job.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(["job.device=cuda but CUDA is not available; use job.device=cpu or auto"])
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_source(cfg: Config) -> Optional[Path]:
    """checkpoint.init_from resolved: a weights file, a checkpoint, or a run's newest checkpoint."""
    if not cfg.checkpoint.init_from:
        return None
    from ..export import resolve_checkpoint

    src = Path(cfg.checkpoint.init_from)
    if not src.exists():
        raise CheckpointError(f"checkpoint.init_from={src}: no such file or directory")
    return src if src.is_file() else resolve_checkpoint(src)


# Settings that define the training sample stream: a resumed run must keep them (the data
# itself is checked by its fingerprint when the loader's state is loaded).
STREAM_KEYS = (("data", "seq_len"), ("training", "global_batch"), ("training", "seed"))


def check_stream_matches(resume: Path, cfg: Config, meta: dict) -> None:
    """Refuse, naming every key, a resume whose config changes the sample stream (meta:
    ``resume``'s meta.json)."""
    saved = meta.get("config", {})
    diff = [f"{a}.{b}: checkpoint {saved[a][b]!r} vs config {getattr(getattr(cfg, a), b)!r}"
            for a, b in STREAM_KEYS if b in saved.get(a, {}) and saved[a][b] != getattr(getattr(cfg, a), b)]
    if diff:
        raise CheckpointError(f"cannot resume from {resume}: the run's sample stream would change ("
                              + ", ".join(diff) + "). Set them back to the checkpoint's values, or start a new "
                              f"job.run_dir with checkpoint.init_from={resume} (its weights; a fresh data stream "
                              f"and optimizer)")


def preflight(cfg: Config) -> tuple[torch.device, Optional[Path]]:
    """Every check that needs no process group, run before anything is created or written:
    what the device cannot run, then ``preflight_checkpoint``."""
    device = resolve_device(cfg)
    problem = refuse_unsupported(device.type, cfg.parallelism.tp, cfg.training.compile,
                                 cfg.training.activation_checkpoint)
    if device.type == "cpu" and cfg.model.attn_backend == "flex":
        problem = ("model.attn_backend=flex cannot train on CPU: FlexAttention has no backward there (torch "
                   f"{torch.__version__.split('+')[0]}); use model.attn_backend=auto or sdpa (the same mask, dense)")
    if problem:
        raise ConfigError([problem])
    return device, preflight_checkpoint(cfg)


def preflight_checkpoint(cfg: Config) -> Optional[Path]:
    """The checkpoint to resume from (complete, not corrupt, same model shape and sample
    stream) or the weights of checkpoint.init_from (same model shape); reads files only, on
    any machine (slurm/entry.py check runs it on the batch host, whose devices may differ)."""
    from ..export import ExportError, exported_model_args

    args = cfg.model.args()
    try:
        resume = resolve_resume(cfg.job.run_dir, cfg.checkpoint.resume)
        if resume is not None:  # verified by resolve_resume
            meta = read_meta(resume)
            check_model_matches(resume, args, meta)
            check_stream_matches(resume, cfg, meta)
        elif (src := init_source(cfg)) is not None:  # a resumed run continues from its own checkpoint
            if src.is_dir():
                check_model_matches(src, args)
            else:
                diff = shape_differences(exported_model_args(src), args)
                if diff:
                    raise CheckpointError(
                        f"checkpoint.init_from={src} holds weights of a different model ("
                        + ", ".join(f"model.{k}: file {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
                        + "); use the file's model settings")
    except (CheckpointError, ExportError) as e:
        raise ConfigError([str(e)]) from e
    return resume


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, resume: Optional[Path],
                 preemption: Optional[Preemption] = None, lease: Optional["RunLease"] = None):
        self.cfg = cfg
        self.lease = lease  # global rank 0's hold on the run directory (main() takes it); None elsewhere
        self._owns_preemption = preemption is None
        self.preemption = preemption if preemption is not None else Preemption()
        t = cfg.training
        p = cfg.parallelism
        self.pdims: ParallelDims = build_parallel_dims(p.dp_replicate, p.dp_shard, p.tp, device)
        self.device = device
        self.is_main = self.pdims.is_main
        self.run_dir = Path(cfg.job.run_dir)
        torch.manual_seed(t.seed)

        # ---- data (the embedded corpus is prepared once; concurrent ranks wait on a lock)
        from ..data.corpus import ensure_corpus
        from ..data.loader import TokenLoader
        from ..data.shards import ShardedTokens

        data_dir = cfg.data.path or ensure_corpus(cfg.data.corpus, cfg.data.tokenizer,
                                                  max_bytes=cfg.data.corpus_max_bytes)
        self.data_dir = Path(data_dir)
        self.train_data = ShardedTokens(data_dir, "train")
        self.train_data.check_tokenizer(cfg.model.vocab_size)
        self.tokenizer_spec = self.train_data.manifest["tokenizer"].get("spec", cfg.data.tokenizer)
        if cfg.data.path and self.tokenizer_spec != cfg.data.tokenizer:
            # data.tokenizer names the embedded corpus's tokenizer; prepared shards carry their own
            self.log(f"[data] {cfg.data.path} was prepared with tokenizer {self.tokenizer_spec!r}; "
                     f"data.tokenizer={cfg.data.tokenizer!r} applies only to the embedded corpus (config.yaml "
                     f"records the one in use)")
            cfg.data.tokenizer = self.tokenizer_spec

        # ---- model: meta -> parallelize -> materialise -> init
        self.model_args = cfg.model.args()
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[t.dtype]
        use_fsdp, self.autocast_dtype, self.mixed_precision = self._precision_plan(dtype)
        model = build_model(self.model_args, device="meta", runtime_device=device)
        self.runtime_args = model.args
        parallelize(model, self.pdims, compile_=t.compile, ac=t.activation_checkpoint, ac_every=t.ac_every,
                    param_dtype=dtype, use_fsdp=use_fsdp, reshard_after_forward=p.reshard_after_forward)
        model.to_empty(device=device)
        model.init_weights(seed=t.seed, device=device)
        if cfg.checkpoint.init_from and resume is None:
            load_model_weights(model, init_source(cfg))
        self.model = model

        o = cfg.optimizer
        impl = o.implementation if o.implementation != "auto" else ("fused" if device.type == "cuda" else "foreach")
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps, fused=impl == "fused", foreach=impl == "foreach")
        self._skip_on_device = impl == "fused"
        self._bad_steps = torch.zeros((), dtype=torch.long, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        dp_rank, dp_world = self.pdims.dp_rank, self.pdims.dp
        self.accum = t.global_batch // (t.micro_batch * dp_world)
        self.loader = TokenLoader(self.train_data, seq_len=cfg.data.seq_len, global_batch=t.global_batch,
                                  micro_batch=t.micro_batch, dp_rank=dp_rank, dp_world=dp_world, seed=t.seed,
                                  num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", device=device)
        self.curriculum = build_curriculum(self.model_args, cfg.curriculum, t.seed)
        self.state = TrainState(self.scheduler, self.loader, self.curriculum)
        self.gc = GcSchedule(t.gc_interval)  # run() and bench_train hold it around their loops

        from .. import __version__

        saved = read_meta(resume) if resume is not None else None  # the resumed checkpoint's meta.json
        meta = {"config": confutil.to_dict(cfg), "model_shape": self.model_args.shape_dict(),
                "model_args": confutil.to_dict(self.model_args), "tokenizer": self.tokenizer_spec,
                "tokenizer_info": self.train_data.manifest["tokenizer"], "data_dir": str(self.data_dir),
                "data_fingerprint": self.train_data.fingerprint, "world_size": self.pdims.world,
                "layout": {"dp_replicate": self.pdims.dp_replicate, "dp_shard": self.pdims.dp_shard,
                           "tp": self.pdims.tp, "fsdp": use_fsdp, "mixed_precision": self.mixed_precision},
                "torch": torch.__version__, "cat_titan": __version__,
                "origin": history_origin(resume, self.run_dir, saved)}
        # Host-side agreement (preemption flags, async-save completion) runs on a CPU group,
        # so nothing in the step loop waits for the GPU; async saves get their own (their
        # collectives run in a background thread, which must not interleave with ours).
        self.cpu_group = dist.new_group(backend="gloo") if self.pdims.world > 1 else None
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, keep_every=cfg.checkpoint.keep_every,
                                         async_save=cfg.checkpoint.async_save, is_main=self.is_main, meta=meta,
                                         async_group=dist.new_group(backend="gloo") if cfg.checkpoint.async_save
                                         else None)
        if resume is not None:
            from ..data.shards import DataError

            try:
                Checkpointer.load(resume, self._stateful())
            except (CheckpointError, DataError) as e:  # nothing is written yet
                raise ConfigError([f"cannot resume from {resume}: {e}"]) from e
            self.log(f"[checkpoint] resumed from {resume} at step {self.state.step}")
            self._apply_optimizer_config(saved)
            self._warn_if_schedule_moves(saved)

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            # Also on a fresh start: an attempt killed before its first checkpoint logged rows
            # that this run logs again.
            self._drop_metrics_after(self.state.step)
        self.metrics = MetricsLogger(self.run_dir, self.is_main, cfg.metrics.tensorboard, cfg.metrics.progress,
                                     t.steps, purge_after=self.state.step)
        self.peak = peak_flops(device)

    def _apply_optimizer_config(self, saved: dict) -> None:
        """A resumed optimizer comes back with the checkpoint's lr, betas, eps and weight decay;
        the schedule's shape comes from this run's config. The config wins for all of them
        (the config.yaml this run writes must say what it trains with); changes are logged."""
        o = self.cfg.optimizer
        old = saved.get("config", {}).get("optimizer", {})
        changed = [f"optimizer.{k} {old[k]} -> {getattr(o, k)}" for k in ("lr", "beta1", "beta2", "eps", "weight_decay")
                   if k in old and old[k] != getattr(o, k)]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for g in self.optimizer.param_groups:
            g["initial_lr"], g["lr"] = o.lr, o.lr * factor
            g["betas"], g["eps"] = (o.beta1, o.beta2), o.eps
        self.optimizer.param_groups[0]["weight_decay"] = o.weight_decay  # param_groups(): [decay, no decay]
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        if changed:
            self.log("[checkpoint] this run's config changes " + ", ".join(changed))

    def _warn_if_schedule_moves(self, saved: dict) -> None:
        """curriculum.per=micro_step draws per (step, micro-step): another number of micro-steps
        per step (another data-parallel layout or micro_batch) continues with another schedule."""
        if self.curriculum is None or self.curriculum.per != "micro_step":
            return
        t, layout = saved.get("config", {}).get("training", {}), saved.get("layout", {})
        dp = layout.get("dp_replicate", 1) * layout.get("dp_shard", 1)
        if "micro_batch" in t and "global_batch" in t:
            before = t["global_batch"] // (t["micro_batch"] * dp)
            if before != self.accum:
                self.log(f"[warning] curriculum.per=micro_step: the checkpoint ran {before} micro-steps per step, "
                         f"this run {self.accum}; from here the chunk sizes differ from the uninterrupted run's "
                         f"(keep the layout and micro_batch, or use curriculum.per=step, for the same schedule)")

    def _stateful(self) -> dict:
        return {"app": ModelOptim(self.model, self.optimizer), "train": self.state}

    def _save(self, blocking: bool = False) -> None:
        self.check_nonfinite()  # "stop" stops before saving; skipped updates were never applied
        self.checkpointer.save(self.state.step, self._stateful(), {"tokens_seen": self.state.tokens_seen},
                               blocking=blocking)

    def _agree(self) -> tuple[bool, bool]:
        """(a preemption signal reached some rank, every rank has written its part of the
        pending async save): one all-reduce per step over a CPU (gloo) group, so the GPU
        stream is never waited for. Also carries rank 0's news that another job took the run
        directory over: then every rank stops here, before any further save."""
        flags = [float(self.preemption.requested), float(not self.checkpointer.pending_done_locally()),
                 float(self.lease is not None and self.lease.lost.is_set())]
        if self.pdims.world > 1:
            t = torch.tensor(flags)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
            flags = t.tolist()
        if flags[2] > 0:
            raise LeaseLost(f"another job took over job.run_dir={self.run_dir} (its lease, {LEASE_NAME}, was not "
                            f"renewed for job.lease_timeout_s={self.cfg.job.lease_timeout_s:g} s, e.g. while this job "
                            f"was suspended); stopped at step {self.state.step} without saving")
        return flags[0] > 0, flags[1] == 0

    def _drop_metrics_after(self, step: int) -> None:
        """metrics.jsonl holds one row per logged step: rows an interrupted attempt logged after
        the checkpoint it is resumed from are logged again, so the old ones go (with a line
        cut short by a crash)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            write_atomic(path, "".join(line + "\n" for line in kept))
            self.log(f"[metrics] metrics.jsonl: dropped {dropped} rows logged after step {step} by an "
                     f"interrupted attempt")

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ---------------------------------------------------------------------------------------
    def _precision_plan(self, dtype: torch.dtype) -> tuple[bool, Optional[torch.dtype], str]:
        """(apply FSDP?, autocast dtype or None, "fsdp" | "autocast" | "none"). FSDP whenever
        there are several data-parallel ranks (and under TP on CUDA, as before); with one rank,
        a low-precision dtype runs as torchtitan's single-device runs do: fp32 weights, bf16
        autocast, no FSDP hooks (measured on an H200, dense 768x12: the GPU was busy 41% of the
        step under FSDP). training.mixed_precision=fsdp keeps FSDP there."""
        mode, dp, tp = self.cfg.training.mixed_precision, self.pdims.dp, self.pdims.tp
        if mode == "autocast" and dp > 1:
            raise ConfigError([f"training.mixed_precision=autocast runs without FSDP, but this job has {dp} "
                               f"data-parallel ranks; use training.mixed_precision=auto or fsdp"])
        wants_fsdp = dp > 1 or mode == "fsdp" or (self.device.type == "cuda" and tp > 1 and mode == "auto")
        if wants_fsdp or dtype == torch.float32:
            return wants_fsdp, None, "fsdp" if wants_fsdp and dtype != torch.float32 else "none"
        if tp > 1:  # DTensor blocks under autocast are not tested
            raise ConfigError([f"training.dtype={self.cfg.training.dtype} with tensor parallelism needs FSDP mixed "
                               f"precision; set training.mixed_precision=fsdp"])
        return False, dtype, "autocast"

    def autocast(self):
        """The forward's mixed-precision context (a no-op under FSDP or in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, chunk_size: Optional[int],
                         accum: int = 1) -> torch.Tensor:
        """One micro-batch's forward (under the run's precision) and backward; gradients
        accumulate. Returns the loss divided by ``accum``, detached."""
        with loss_parallel_context():  # TP: the loss runs on vocabulary-sharded logits
            with self.autocast():  # backward outside: autograd replays the forward's casts
                loss = self.model(x, y, chunk_size=chunk_size) / accum
            loss.backward()
        return loss.detach()

    def _mean_over_dp(self, x: torch.Tensor) -> float:
        x = x.detach().float().reshape(1).clone()
        dist.all_reduce(x)
        return x.item() / self.pdims.world

    def train_step(self) -> dict:
        """One optimizer step. No device->host synchronisation: the host stays ahead of the
        GPU. A non-finite loss or gradient norm skips the update on the device (fused AdamW's
        ``found_inf``) and is reported at the next ``check_nonfinite`` (log steps, saves, the
        end); the foreach/for-loop optimizers cannot skip on the device and check here."""
        t = self.cfg.training
        step = self.state.step
        self.gc.maybe_collect(step)
        total = torch.zeros((), device=self.device)
        sizes = []
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            c = self.curriculum.chunk_size(step, micro, self.accum) if self.curriculum else None
            sizes.append(c)
            total += self.forward_backward(x, y, c, self.accum)
        params = self.model.parameters()  # fused AdamW clips inside its kernel (grad_scale, below)
        norm = grad_norm(params)[1] if self._skip_on_device else \
            clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        # The global gradient norm decides (the same value on every rank, so all ranks skip
        # together); a non-finite loss makes it non-finite too.
        bad = ~torch.isfinite(norm)  # () bool, on the device
        if self._skip_on_device:
            self.optimizer.found_inf = bad.float()  # 1.0: the fused kernel leaves params and state alone
            # The kernel divides each gradient by grad_scale as it reads it: clipping without
            # its own read-multiply-write pass over every gradient (~1 ms/step for cat-150m).
            self.optimizer.grad_scale = clip_divisor(norm, t.grad_clip) if t.grad_clip > 0 else None
            self.optimizer.step()
            stop_now = False  # reported at the next check
        else:  # a host sync: the foreach/for-loop optimizers cannot skip on the device
            stop_now = bool(bad)
            if not stop_now:
                self.optimizer.step()
            stop_now = stop_now and t.nonfinite == "stop"
        # First bad step (1-based; -1 while none) and a count, on the device until a check.
        self._first_bad = torch.where(bad & (self._first_bad < 0), step + 1, self._first_bad)
        self._bad_steps += bad
        if stop_now:
            self.check_nonfinite(loss=total, norm=norm)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applied (step() moves to the next)
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += t.global_batch * self.cfg.data.seq_len
        return {"loss": total, "grad_norm": norm, "chunk_sizes": sizes, "lr": lr}

    def check_nonfinite(self, loss: Optional[torch.Tensor] = None, norm: Optional[torch.Tensor] = None) -> int:
        """Steps skipped for a non-finite loss/gradient norm since the last check (a host sync).
        ``training.nonfinite=stop`` raises here; the skipped updates were never applied, so
        the weights in memory and in every checkpoint are those of the last good step."""
        count = int(self._bad_steps)
        if not count:
            return 0
        first = int(self._first_bad)
        self._bad_steps.zero_()
        self._first_bad.fill_(-1)
        detail = f" (loss {loss.item()}, grad norm {norm.item()})" if loss is not None and norm is not None else ""
        if self.cfg.training.nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient norm at step {first}{detail}; the update was not "
                                 f"applied; lower optimizer.lr, or set training.nonfinite=skip")
        self.log(f"[warning] {count} step(s) skipped for a non-finite loss or gradient norm, the first at step "
                 f"{first}{detail}")
        return count

    @torch.no_grad()
    def evaluate(self) -> dict:
        from ..data.loader import validation_batches
        from ..data.shards import DataError

        t = self.cfg.training
        try:
            batches = validation_batches(self.data_dir, self.cfg.data.seq_len, t.micro_batch * self.pdims.dp,
                                         t.eval_batches, dp_rank=self.pdims.dp_rank, dp_world=self.pdims.dp)
        except DataError as e:
            self.log(f"[eval] skipped: {e}")
            return {}
        self.model.eval()
        sizes = self.curriculum.drawn_sizes if self.curriculum else [None]  # not a size training never ran
        out = {}
        for c in sizes:
            total = torch.zeros((), device=self.device)
            for x, y in batches:
                with self.autocast():
                    total += self.model(x.to(self.device), y.to(self.device), chunk_size=c)
            key = "" if c is None or len(sizes) == 1 else f"_chunk{c}"
            out[key] = self._mean_over_dp(total / len(batches))
        self.model.train()
        return out

    @torch.no_grad()
    def sample(self) -> Optional[str]:
        """Greedy text from the trained model (full forward per token; every rank computes)."""
        from ..data.tokenizer import get_tokenizer

        t = self.cfg.training
        if t.sample_tokens <= 0:
            return None
        try:
            tok = get_tokenizer(self.tokenizer_spec)
        except Exception as e:  # the run is done; a missing tokenizer only skips the sample
            self.log(f"[sample] skipped: {e}")
            return None
        ids = torch.tensor([tok.encode(t.sample_prompt) or [tok.eot_id]], device=self.device)
        vocab = min(tok.vocab_size, self.model_args.vocab_size)  # the model may pad beyond the tokenizer
        self.model.eval()
        seq_len = self.cfg.data.seq_len
        # adaptive CATs: the largest size training drew (the model's own default may never have been)
        kw = {"chunk_size": max(self.curriculum.drawn_sizes)} if self.curriculum else {}
        for _ in range(t.sample_tokens):
            window = ids[:, -seq_len:]
            n = window.shape[1]
            # Causal models: zeros after the window change nothing before it. Padding to a
            # power of two (at least 64, at most seq_len) keeps compiled blocks to a few
            # static shapes instead of one per length.
            bucket = min(seq_len, max(64, 1 << (n - 1).bit_length()))
            padded = torch.nn.functional.pad(window, (0, max(0, bucket - n)))
            with self.autocast():
                nxt = self.model(padded, **kw)[:, n - 1, :vocab].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        self.model.train()
        return tok.decode(ids[0].tolist())

    # ---------------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            with self.gc:
                return self._run()
        except NonFiniteError:
            # Every rank stops at the same step (the loss and norm are global): finish the
            # pending async save, a checkpoint of good weights that a resubmission resumes from.
            self.checkpointer.close()
            raise
        finally:
            if self._owns_preemption:
                self.preemption.close()

    def _run(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        self.model.train()
        start_step = self.state.step
        if start_step >= t.steps:
            self.log(f"nothing to do: already at step {start_step} of {t.steps}")
            return EXIT_OK
        self.log(f"training {self.model_args.kind} ({self.model.num_params() / 1e6:.2f}M parameters) for "
                 f"{t.steps} steps on {self.pdims.world} x {self.device.type} (dp {self.pdims.dp}, "
                 f"accumulation {self.accum}, mixed precision {self.mixed_precision}), run dir {self.run_dir}")
        window_t, window_steps, window_sizes = time.time(), 0, []
        flops_cache: dict = {}
        while self.state.step < t.steps:
            out = self.train_step()
            window_steps += 1
            window_sizes += out["chunk_sizes"]  # None for non-adaptive models
            step = self.state.step
            if step % cfg.metrics.log_interval == 0 or step == t.steps:
                loss = self._mean_over_dp(out["loss"])
                if not math.isfinite(loss) and t.nonfinite == "stop":
                    raise NonFiniteError(f"non-finite training loss {loss} at step {step}; lower optimizer.lr, or "
                                         f"set training.nonfinite=skip")
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - window_t
                tps = window_steps * t.global_batch * cfg.data.seq_len / dt
                sizes = [c for c in out["chunk_sizes"] if c is not None]
                key = sizes[-1] if sizes else None
                for c in set(window_sizes):
                    if c not in flops_cache:
                        flops_cache[c] = flops_per_token(self.model_args, cfg.data.seq_len, c)
                # every micro-step has the same tokens: the window's FLOPs per token are the mean
                # over its micro-steps' chunk sizes (adaptive CATs: up to ~3x apart)
                flops = statistics.mean(flops_cache[c] for c in window_sizes)
                row = {"step": step, "loss": loss, "lr": out["lr"],
                       "grad_norm": float(out["grad_norm"]), "tokens_per_sec": tps,
                       "tokens_per_sec_per_device": tps / self.pdims.world,
                       "mfu": mfu(tps, flops, self.peak, self.pdims.world),
                       "tokens_seen": self.state.tokens_seen, "start_step": start_step}
                if self.curriculum is not None:
                    row["chunk_size"] = key
                    row["chunk_sizes"] = out["chunk_sizes"]
                if self.device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                if t.compile:  # grows only while new shapes (e.g. chunk sizes) are first seen
                    row["graphs_compiled"] = compiled_graphs()
                skipped = self.check_nonfinite()
                if skipped:
                    row["skipped_steps"] = skipped
                self.metrics.log(row)
                window_t, window_steps, window_sizes = time.time(), 0, []
            else:
                self.metrics.show_progress(step, float("nan"))
            if t.eval_interval and step % t.eval_interval == 0 and step < t.steps:
                self.metrics.log_eval(step, self.evaluate())
            preempted, saves_written = self._agree()
            if self.checkpointer.pending and saves_written:
                self.checkpointer.finalize_pending()  # marker only once every rank's shards are on disk
            if preempted and step < t.steps:
                self._save(blocking=True)
                self.checkpointer.close()
                self.metrics.close()
                self.log(f"[preemption] checkpoint saved at step {step}; exiting with status {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < t.steps:
                self._save()
        # The final checkpoint before the final evaluation and sample: a preemption during
        # those loses nothing.
        if cfg.checkpoint.save_final:
            self._save(blocking=True)
        self.checkpointer.close()
        self.metrics.log_eval(self.state.step, self.evaluate())
        text = self.sample()
        if text is not None:
            self.log("sample: " + repr(text))
        self.metrics.close()
        return EXIT_OK


def parse_cli(argv):
    p = argparse.ArgumentParser(prog="train.py", description="Train a CAT (or dense baseline) with cat_titan.",
                                epilog="Overrides: dotted key.path=value pairs, e.g. training.steps=100 "
                                       "model.preset=cat-150m. --help-config lists every key.")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_cli(argv)
    if a.help_config:
        print(confutil.describe(Config))
        return EXIT_OK
    owns_group = not dist.is_initialized()  # a caller's process group is left to the caller
    preemption = Preemption()  # before the slow setup: a stop signal during it is honoured after step 1
    lease = None
    try:
        cfg = load_config(a.config, a.overrides)
        device, resume = preflight(cfg)
        from ..data.shards import DataError
        from ..data.tokenizer import TokenizerError

        # before anything is written; the other ranks follow rank 0 (its exit 2 stops the launch)
        if cfg.job.lease_timeout_s and int(os.environ.get("RANK", "0")) == 0:
            try:
                lease = RunLease(cfg.job.run_dir, cfg.job.lease_timeout_s,
                                 log=lambda msg: print(msg, file=sys.stderr, flush=True)).acquire()
            except LeaseError as e:
                raise ConfigError([str(e)]) from e
        try:
            trainer = Trainer(cfg, device, resume, preemption, lease)
        except (DataError, TokenizerError) as e:  # data/tokenizer settings, found when opening them: not a crash
            raise ConfigError([str(e)]) from e
        return trainer.run()
    except (ConfigError, LeaseLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as e:  # the weights in memory and in every checkpoint are the last good step's
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        # the group first: a signal while it is torn down must still find our handlers (a
        # rank whose checkpoint is complete would otherwise die of it instead of exiting 75)
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
        preemption.close()
        if lease is not None:
            lease.release()
