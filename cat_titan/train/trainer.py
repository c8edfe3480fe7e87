"""The training loop: config -> mesh -> model on meta -> parallelize -> init or resume ->
loop { batch -> chunk size -> forward/backward (accumulated) -> clip -> step -> schedule ->
metrics -> eval -> checkpoint } -> final checkpoint -> sample.

Exit status (documented for launch scripts): 0 finished; 2 bad configuration or run
directory (nothing was written); 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint
(requeue and resume); anything else is a crash.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .. import confutil
from ..config import Config, load_config, save_config
from ..confutil import ConfigError
from ..models.registry import build_model, flops_per_token
from ..parallel.mesh import ParallelDims, build_parallel_dims
from ..parallel.parallelize import param_groups, parallelize, refuse_unsupported
from .checkpoint import (Checkpointer, CheckpointError, ModelOptim, TrainState, check_model_matches,
                         load_model_weights, read_meta, resolve_resume)
from .curriculum import build_curriculum
from .metrics import MetricsLogger, peak_flops

EXIT_OK, EXIT_USAGE, EXIT_PREEMPTED = 0, 2, 75


class NonFiniteError(RuntimeError):
    pass


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


class Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop agrees on it across ranks at step boundaries.
    A second signal only sets the flag again: a save in progress is never interrupted."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if not self.requested:
            print(f"[preemption] received {signal.Signals(signum).name}: saving at the end of this step",
                  file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.job.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(["job.device=cuda but CUDA is not available; use job.device=cpu or auto"])
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def preflight(cfg: Config) -> tuple[torch.device, Optional[Path]]:
    """Every check that needs no process group, run before anything is created or written."""
    device = resolve_device(cfg)
    problem = refuse_unsupported(device.type, cfg.parallelism.tp, cfg.training.compile)
    if problem:
        raise ConfigError([problem])
    try:
        resume = resolve_resume(cfg.job.run_dir, cfg.checkpoint.resume)
        if resume is not None:
            check_model_matches(resume, cfg.model.args().shape_dict())
        if cfg.checkpoint.init_from:
            src = Path(cfg.checkpoint.init_from)
            if not src.exists():
                raise CheckpointError(f"checkpoint.init_from={src}: no such file or directory")
            if src.is_dir():
                check_model_matches(src, cfg.model.args().shape_dict())
    except CheckpointError as e:
        raise ConfigError([str(e)]) from e
    return device, resume


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, resume: Optional[Path]):
        self.cfg = cfg
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

        # ---- model: meta -> parallelize -> materialise -> init
        self.model_args = cfg.model.args()
        use_fsdp = device.type == "cuda" or self.pdims.dp > 1
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[t.dtype]
        if not use_fsdp and dtype != torch.float32:
            raise ConfigError([f"training.dtype={t.dtype} needs FSDP mixed precision (CUDA or several ranks)"])
        model = build_model(self.model_args, device="meta", runtime_device=device)
        self.runtime_args = model.args
        parallelize(model, self.pdims, compile_=t.compile, ac=t.activation_checkpoint, ac_every=t.ac_every,
                    param_dtype=dtype, use_fsdp=use_fsdp, reshard_after_forward=p.reshard_after_forward)
        model.to_empty(device=device)
        model.init_weights(seed=t.seed, device=device)
        if cfg.checkpoint.init_from and resume is None:
            load_model_weights(model, Path(cfg.checkpoint.init_from))
        self.model = model

        o = cfg.optimizer
        impl = o.implementation if o.implementation != "auto" else ("fused" if device.type == "cuda" else "foreach")
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps, fused=impl == "fused", foreach=impl == "foreach")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        dp_rank, dp_world = self.pdims.dp_rank, self.pdims.dp
        self.accum = t.global_batch // (t.micro_batch * dp_world)
        self.loader = TokenLoader(self.train_data, seq_len=cfg.data.seq_len, global_batch=t.global_batch,
                                  micro_batch=t.micro_batch, dp_rank=dp_rank, dp_world=dp_world, seed=t.seed,
                                  num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", device=device)
        self.curriculum = build_curriculum(self.model_args, cfg.curriculum, t.seed)
        self.state = TrainState(self.scheduler, self.loader, self.curriculum)

        meta = {"config": confutil.to_dict(cfg), "model_shape": self.model_args.shape_dict(),
                "model_args": confutil.to_dict(self.model_args), "tokenizer": self.tokenizer_spec,
                "world_size": self.pdims.world, "torch": torch.__version__}
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, keep_every=cfg.checkpoint.keep_every,
                                         async_save=cfg.checkpoint.async_save, is_main=self.is_main, meta=meta,
                                         async_group=dist.new_group(backend="gloo") if cfg.checkpoint.async_save
                                         else None)
        if resume is not None:
            read_meta(resume)
            Checkpointer.load(resume, self._stateful())
            if self.is_main:
                print(f"[checkpoint] resumed from {resume} at step {self.state.step}", flush=True)

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(self.run_dir, self.is_main, cfg.metrics.tensorboard, cfg.metrics.progress,
                                     t.steps)
        self.preemption = Preemption()
        self.peak = peak_flops(device)

    def _stateful(self) -> dict:
        return {"app": ModelOptim(self.model, self.optimizer), "train": self.state}

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ---------------------------------------------------------------------------------------
    def _mean_over_dp(self, x: torch.Tensor) -> float:
        x = x.detach().float().reshape(1).clone()
        dist.all_reduce(x)
        return x.item() / self.pdims.world

    def train_step(self) -> dict:
        t = self.cfg.training
        step = self.state.step
        total = torch.zeros((), device=self.device)
        sizes = []
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            c = self.curriculum.chunk_size(step, micro, self.accum) if self.curriculum else None
            sizes.append(c)
            loss = self.model(x, y, chunk_size=c) / self.accum
            loss.backward()
            total += loss.detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(total))
        skipped = False
        if not finite:
            if t.nonfinite == "stop":
                raise NonFiniteError(f"non-finite loss or gradient norm at step {step + 1} (loss {total.item()}, "
                                     f"grad norm {norm.item()}); lower optimizer.lr, or set training.nonfinite=skip")
            skipped = True
            self.log(f"[warning] non-finite loss/grad at step {step + 1}: step skipped")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += t.global_batch * self.cfg.data.seq_len
        return {"loss": total, "grad_norm": norm, "chunk_sizes": sizes, "skipped": skipped}

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
        sizes = self.curriculum.sizes if self.curriculum else [None]
        out = {}
        for c in sizes:
            total = torch.zeros((), device=self.device)
            for x, y in batches:
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
        for _ in range(t.sample_tokens):
            window = ids[:, -self.cfg.data.seq_len:]
            nxt = self.model(window)[:, -1, :vocab].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        self.model.train()
        return tok.decode(ids[0].tolist())

    # ---------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        self.model.train()
        start_step = self.state.step
        if start_step >= t.steps:
            self.log(f"nothing to do: already at step {start_step} of {t.steps}")
            return EXIT_OK
        self.log(f"training {self.model_args.kind} ({self.model.num_params() / 1e6:.2f}M parameters) for "
                 f"{t.steps} steps on {self.pdims.world} x {self.device.type} (dp {self.pdims.dp}, "
                 f"accumulation {self.accum}), run dir {self.run_dir}")
        window_t, window_steps = time.time(), 0
        flops_cache: dict = {}
        while self.state.step < t.steps:
            out = self.train_step()
            window_steps += 1
            step = self.state.step
            if step % cfg.metrics.log_interval == 0 or step == t.steps:
                loss = self._mean_over_dp(out["loss"])
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - window_t
                tps = window_steps * t.global_batch * cfg.data.seq_len / dt
                sizes = [c for c in out["chunk_sizes"] if c is not None]
                key = sizes[-1] if sizes else None
                if key not in flops_cache:
                    flops_cache[key] = flops_per_token(self.model_args, cfg.data.seq_len, key)
                row = {"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": float(out["grad_norm"]), "tokens_per_sec": tps,
                       "tokens_per_sec_per_device": tps / self.pdims.world,
                       "mfu": (tps * flops_cache[key] / (self.peak * self.pdims.world)) if self.peak else None,
                       "tokens_seen": self.state.tokens_seen, "start_step": start_step}
                if self.curriculum is not None:
                    row["chunk_size"] = key
                    row["chunk_sizes"] = out["chunk_sizes"]
                if self.device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                if out["skipped"]:
                    row["skipped"] = True
                self.metrics.log(row)
                window_t, window_steps = time.time(), 0
            else:
                self.metrics.show_progress(step, float("nan"))
            if t.eval_interval and step % t.eval_interval == 0 and step < t.steps:
                self.metrics.log_eval(step, self.evaluate())
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < t.steps:
                self.checkpointer.save(step, self._stateful())
            if self.preemption.agreed(self.device):
                self.checkpointer.save(step, self._stateful())
                self.checkpointer.wait()
                self.log(f"[preemption] checkpoint saved at step {step}; exiting with status {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
        self.metrics.log_eval(self.state.step, self.evaluate())
        if cfg.checkpoint.save_final:
            self.checkpointer.save(self.state.step, self._stateful())
        self.checkpointer.wait()
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
    try:
        cfg = load_config(a.config, a.overrides)
        device, resume = preflight(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    owns_group = not dist.is_initialized()  # a caller's process group is left to the caller
    try:
        trainer = Trainer(cfg, device, resume)
        return trainer.run()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
