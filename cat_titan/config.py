"""The training configuration: typed sections, loaded from YAML plus ``key.path=value`` overrides.

Precedence: overrides > YAML file > model preset (``model.preset``) > defaults. Every problem
(unknown keys, wrong types, inconsistent values) is reported at once, before any process
group, model or file is created (DESIGN.md, "CLI").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Literal, Optional

from . import confutil
from .models.args import ModelArgs
from .models.registry import PRESETS, get_preset


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    """Everything the run writes goes here: config.yaml, metrics.jsonl, tensorboard events, checkpoints/."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train: auto picks CUDA when available."""
    description: str = ""
    """Free text stored with the run."""
    lease_timeout_s: float = 300.0
    """One job per run_dir: rank 0 holds run_dir/.lease.json and renews it every timeout/10 s; another job's
    lease counts as abandoned this long after its last heartbeat (or at once if its process is gone from
    this host, or it is this job's own: a requeue, or under Slurm the same step restarting; see
    cat_titan/train/lease.py). 0: no lease."""


@dataclass
class ModelConfig(ModelArgs):
    preset: Optional[str] = None
    """Named preset filling every model field not given explicitly (see cat_titan/models/registry.py)."""

    def args(self) -> ModelArgs:
        return ModelArgs(**{f.name: getattr(self, f.name) for f in fields(ModelArgs)})

    def validate(self) -> list[str]:
        if self.preset is not None and self.preset not in PRESETS:
            return [f"model.preset='{self.preset}' is unknown; presets: {sorted(PRESETS)}"]
        return super().validate()


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Directory prepared by tools/prepare_data.py; None trains on the embedded corpus."""
    corpus: Literal["stdlib"] = "stdlib"
    """Embedded corpus used when data.path is None (the running Python's standard library sources)."""
    tokenizer: str = "byte"
    """Tokenizer for the embedded corpus: byte, a tiktoken encoding name, or a .tiktoken file."""
    corpus_max_bytes: Optional[int] = None
    """Cap on the embedded corpus size in bytes (None: all of it)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    num_workers: int = 0
    """DataLoader worker processes prefetching batches (0: in the training process)."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay; never applied to norms, embeddings or biases."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """AdamW kernel: auto is fused on CUDA, foreach elsewhere."""


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warmup: cosine decay, warmup-stable-decay, or constant."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to the peak."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine, wsd)."""
    decay_fraction: float = 0.2
    """wsd: fraction of training spent in the final linear decay."""


@dataclass
class TrainingConfig:
    steps: int = 100
    """Optimizer steps to train for."""
    seed: int = 0
    """Seed for weights, data order and the chunk-size curriculum."""
    global_batch: int = 8
    """Sequences per optimizer step, summed over data-parallel ranks and micro-steps."""
    micro_batch: int = 8
    """Sequences per rank per forward/backward; gradient accumulation = global / (micro x dp)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: auto is bfloat16 on CUDA (fp32 master weights and reductions), float32 on CPU."""
    mixed_precision: Literal["auto", "fsdp", "autocast"] = "auto"
    """How a bfloat16 dtype is applied. fsdp: FSDP casts the gathered weights (and reduces
    gradients in fp32); autocast: no FSDP, fp32 weights and torch.autocast around the forward
    (one data-parallel rank only). auto: autocast on a single CUDA device without TP (FSDP's
    per-block hooks there cost more host time than the GPU spends on a small model), fsdp
    otherwise."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient norm: stop with an error, or skip the step."""
    compile: bool = False
    """torch.compile every block in place (CUDA; see the parallelism notes for refused combinations)."""
    activation_checkpoint: Literal["none", "full", "every_n", "selective"] = "none"
    """Activation checkpointing: every block, every n-th block, or op-level selective."""
    ac_every: int = 2
    """activation_checkpoint=every_n: checkpoint one block in this many."""
    eval_interval: int = 0
    """Validation loss every this many steps (0: only at the end)."""
    eval_batches: int = 4
    """Validation batches (of micro_batch sequences per rank) per evaluation."""
    sample_tokens: int = 64
    """Tokens of greedy text generated at the end of training (0 disables)."""
    sample_prompt: str = "def "
    """Prompt of the end-of-training sample."""
    gc_interval: int = 0
    """Run Python's garbage collector (young generations) every this many steps instead of
    automatically, as torchtitan does (e.g. 50), so no collection lands inside a step while the
    GPU waits for the host (0: Python's automatic collection). No measured effect here yet."""


@dataclass
class ParallelismConfig:
    dp_replicate: int = 1
    """HSDP replica groups (1: plain FSDP)."""
    dp_shard: int = -1
    """FSDP shard group size; -1 takes what the world size leaves after dp_replicate and tp."""
    tp: int = 1
    """Tensor-parallel degree (attention heads and MLP split across ranks)."""
    reshard_after_forward: Literal["default", "always", "never"] = "default"
    """FSDP: free gathered parameters after forward (default: yes except for the last block, and
    never when the shard group has one rank, where re-gathering is a copy for nothing)."""


@dataclass
class CurriculumConfig:
    kind: Literal["uniform", "weights", "round_robin", "fixed"] = "uniform"
    """Adaptive CATs: draw chunk sizes uniformly, by weights, cycle through them, or always use the max."""
    min_chunk_size: int = 1
    """Smallest chunk size drawn (a power of two)."""
    max_chunk_size: Optional[int] = None
    """Largest chunk size drawn (None: model.chunk_size)."""
    weights: list[float] = field(default_factory=list)
    """kind=weights: one weight per chunk size from min to max, ascending."""
    per: Literal["step", "micro_step"] = "step"
    """Draw a new chunk size per optimizer step or per micro-batch (micro_step: the same size on
    every rank at a time, so the schedule depends on the micro-steps per step, i.e. on the
    data-parallel layout)."""

    def validate(self) -> list[str]:
        errs = []
        for name in ("min_chunk_size", "max_chunk_size"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v & (v - 1)):
                errs.append(f"curriculum.{name}={v} must be a power of two")
        if self.kind == "weights" and (not self.weights or any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            errs.append(f"curriculum.weights={self.weights} must be non-negative with a positive sum for kind=weights")
        return errs


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps (0: only at the end)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in the run directory; never; or a checkpoint path."""
    init_from: Optional[str] = None
    """Start a new run from the weights of this checkpoint or exported .safetensors file (no optimizer state)."""
    keep: int = 3
    """Complete checkpoints kept (the newest is never deleted)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this forever (0: off)."""
    async_save: bool = False
    """Write checkpoints in the background while training continues (never two in flight)."""
    save_final: bool = True
    """Save a checkpoint when training ends."""


@dataclass
class MetricsConfig:
    log_interval: int = 10
    """Log every this many steps (console, metrics.jsonl, tensorboard)."""
    tensorboard: bool = True
    """Write tensorboard event files under run_dir/tensorboard."""
    progress: Literal["auto", "on", "off"] = "auto"
    """A live progress line on interactive terminals (never in log files)."""


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    """Run directory and device."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture (a preset plus overrides)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The loop."""
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    """Data and tensor parallel degrees."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Chunk-size schedule for adaptive CATs."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Logging."""

    def validate(self) -> list[str]:
        """Cross-section checks (single sections check themselves)."""
        errs: list[str] = []
        t, m, d, p = self.training, self.model, self.data, self.parallelism
        for name in ("steps", "global_batch", "micro_batch"):
            if getattr(t, name) <= 0:
                errs.append(f"training.{name}={getattr(t, name)} must be positive")
        # 0 has a documented meaning for these; a negative value was silently misread (interval -1
        # saved every step, keep_every -2 acted like 2) or crashed later (num_workers -1).
        for key, value, zero in (("training.gc_interval", t.gc_interval, "Python's automatic collection"),
                                 ("training.eval_interval", t.eval_interval, "only at the end"),
                                 ("checkpoint.interval", self.checkpoint.interval, "only at the end"),
                                 ("checkpoint.keep_every", self.checkpoint.keep_every, "off"),
                                 ("data.num_workers", d.num_workers, "load in the training process")):
            if value < 0:
                errs.append(f"{key}={value} must be >= 0 (0: {zero})")
        if self.job.lease_timeout_s != 0 and not self.job.lease_timeout_s >= 10:  # beats every timeout/10 s
            errs.append(f"job.lease_timeout_s={self.job.lease_timeout_s} must be >= 10 seconds, or 0 for no lease")
        if t.activation_checkpoint == "every_n" and t.ac_every < 1:  # 0 divided by zero, -1 acted as full
            errs.append(f"training.ac_every={t.ac_every} must be >= 1 (checkpoint one block in this many)")
        if t.eval_batches < 1:  # the validation loss is a mean over them: none gives nan
            errs.append(f"training.eval_batches={t.eval_batches} must be >= 1 (batches averaged into the "
                        f"validation loss)")
        if d.corpus_max_bytes is not None and d.corpus_max_bytes <= 0:  # 0 would select no file at all
            errs.append(f"data.corpus_max_bytes={d.corpus_max_bytes} must be positive, or null for the whole corpus")
        if d.seq_len <= 0:
            errs.append(f"data.seq_len={d.seq_len} must be positive")
        elif d.seq_len > m.block_size:
            errs.append(f"data.seq_len={d.seq_len} exceeds model.block_size={m.block_size}; raise model.block_size "
                        f"or shorten data.seq_len")
        if m.kind in ("cat", "cat_layer") and d.seq_len % m.chunk_size:
            errs.append(f"model.chunk_size={m.chunk_size} must divide data.seq_len={d.seq_len}")
        if m.kind == "cat_adaptive" and d.seq_len % (self.curriculum.max_chunk_size or m.chunk_size):
            errs.append(f"the largest chunk size {self.curriculum.max_chunk_size or m.chunk_size} must divide "
                        f"data.seq_len={d.seq_len}")
        if m.kind == "cat_adaptive":
            top = self.curriculum.max_chunk_size or m.chunk_size
            if top > m.chunk_size:
                errs.append(f"curriculum.max_chunk_size={top} exceeds model.chunk_size={m.chunk_size}")
            if self.curriculum.min_chunk_size > top:
                errs.append(f"curriculum.min_chunk_size={self.curriculum.min_chunk_size} exceeds the largest "
                            f"chunk size {top}")
            if self.curriculum.kind == "weights":
                n = len(sizes_between(self.curriculum.min_chunk_size, top))
                if len(self.curriculum.weights) != n:
                    errs.append(f"curriculum.weights has {len(self.curriculum.weights)} entries; chunk sizes "
                                f"{sizes_between(self.curriculum.min_chunk_size, top)} need {n}")
        degree_errs = [f"parallelism.{name}={getattr(p, name)} must be >= 1"
                       for name in ("dp_replicate", "tp") if getattr(p, name) < 1]
        if p.dp_shard == 0 or p.dp_shard < -1:
            degree_errs.append(f"parallelism.dp_shard={p.dp_shard} must be -1 or >= 1")
        errs += degree_errs
        if not degree_errs and t.micro_batch > 0:
            errs += parallel_problems(self, int(os.environ.get("WORLD_SIZE", "1")))
        if self.checkpoint.keep < 1:
            errs.append(f"checkpoint.keep={self.checkpoint.keep} must be >= 1 (the newest checkpoint is always kept)")
        if self.metrics.log_interval < 1:
            errs.append(f"metrics.log_interval={self.metrics.log_interval} must be >= 1")
        return errs

    def dp_degrees(self, world: int) -> tuple[int, int]:
        p = self.parallelism
        shard = p.dp_shard if p.dp_shard != -1 else world // (p.dp_replicate * p.tp)
        return p.dp_replicate, shard


def sizes_between(lo: int, hi: int) -> list[int]:
    out, c = [], lo
    while c <= hi:
        out.append(c)
        c *= 2
    return out


def parallel_problems(cfg: Config, world: int) -> list[str]:
    errs = []
    p, t, m = cfg.parallelism, cfg.training, cfg.model
    rep, shard = cfg.dp_degrees(world)
    if shard < 1 or rep * shard * p.tp != world:
        errs.append(f"parallelism: dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp} does not match "
                    f"the world size {world} (WORLD_SIZE); set dp_shard=-1 or adjust the degrees")
        return errs
    dp = rep * shard
    if t.global_batch % (t.micro_batch * dp):
        fits = [m for m in range(t.micro_batch, 0, -1) if t.global_batch % (m * dp) == 0]
        fix = (f"; e.g. training.micro_batch={fits[0]}" if fits else
               f"; e.g. training.global_batch={t.micro_batch * dp * max(1, t.global_batch // (t.micro_batch * dp))}")
        errs.append(f"training.global_batch={t.global_batch} must be a multiple of training.micro_batch="
                    f"{t.micro_batch} x data-parallel size {dp} = {t.micro_batch * dp}{fix}")
    # the trainer's precision plan (Trainer._precision_plan), checked before any work
    if t.mixed_precision == "autocast" and dp > 1:
        errs.append(f"training.mixed_precision=autocast runs without FSDP, but this job has {dp} data-parallel "
                    f"ranks; use training.mixed_precision=auto or fsdp")
    elif t.mixed_precision == "autocast" and p.tp > 1 and t.dtype != "float32":
        errs.append(f"training.mixed_precision=autocast with parallelism.tp={p.tp} is not supported (tensor-parallel "
                    f"blocks under autocast are untested); set training.mixed_precision=fsdp")
    if p.tp > 1:
        # a CAT layer's inner attention has its own heads: n_heads only sets its rotary width
        dense = m.kind != "cat_layer" or "dense" in m.layer_kinds()
        heads = [("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)] if dense else []
        if m.kind in ("cat", "cat_adaptive"):
            heads += [("model.compressor_heads", m.compressor_heads), ("model.compressor_kv_heads", m.c_kv_heads)]
        if m.kind == "cat_layer":
            heads.append(("CAT-layer heads (dim_fx/cat_layer_head_dim)", m.fx_dim // m.cat_layer_head_dim))
        for name, h in heads:
            if h % p.tp:
                errs.append(f"{name}={h} is not divisible by parallelism.tp={p.tp}")
    return errs


def _merge_preset(data: dict) -> dict:
    """Fill model fields from model.preset where the file/overrides did not set them."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("preset"), str) and model["preset"] in PRESETS:
        base = confutil.to_dict(get_preset(model["preset"]))
        data = {**data, "model": {**base, **model}}
    return data


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """YAML file + dotted overrides -> validated Config; raises ConfigError listing every problem."""
    return confutil.load(Config, path, overrides, prepare=_merge_preset)


def save_config(cfg: Config, path) -> None:
    confutil.dump_yaml(cfg, path)
