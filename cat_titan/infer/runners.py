"""Cached forward passes for generation: one prefill, then one decoder position per step.

A *runner* owns the caches of one batch and computes next-token logits. It drives the
model's own submodules (embeddings, norms, ``wqkv``/``wo``, feed-forwards, compressor,
head) so the arithmetic is the model's; only the sequence bookkeeping is new here.

Every sequence of the batch keeps its own timeline: position ``pos[b]`` is the index of
the token being fed, chunk ``pos // C`` and phase ``pos % C`` follow from it, so prompts of
different lengths need no shifting and chunk boundaries stay where the model saw them in
training (prompts are right-padded for the prefill; see generate.py).

Cache layouts (columns of a ``(B, heads, N, head_dim)`` K/V buffer). Every cache is
*column-causal*: a query written at column c sees exactly the columns [0, c], so a decode
step passes only each query's visible length ``c + 1`` to ``decode_attention`` (no mask;
on CUDA a kernel that reads only those columns):

* dense layer: ``N = max_len``, column ``t`` holds position ``t``.
* CAT decoder / CAT layer, for a row whose current chunk is k::

      [fx_0 .. fx_k | sep_k | t_0 .. t_j of chunk k | stale .. | scratch]
       columns 0..k   k+1    k+s .. k+s+j             (s = 2 with separators, else 1)

  which is exactly what a query of chunk k may see (masks.py: fx_i for i <= k, its own
  sep_k, the tokens of its chunk up to itself). When chunk k completes, fx_{k+1} is written
  at column k+1 (over sep_k, or over t_0 of chunk k, neither visible to anything later),
  sep_{k+1} after it, and chunk k+1's tokens from column k+1+s on. ``N = max_len // C + s + C``
  (+1 scratch column for adaptive models, which a dummy query writes to) instead of
  ``max_len + max_len // C``.

Static shapes: a step has a fixed query length T (1; adaptive CATs use T=2 on steps where
some row completes a chunk), every write is an indexed assignment at per-row columns and
visibility is a per-query length, so ``_decode`` traces once per
(T, completes-a-chunk) variant under ``torch.compile``. Caches are zero-initialised:
on the SDPA path a masked column still enters the matmuls, and NaN * 0 would poison the row.

Cache writes are ``cache[rows, :, cols] = kv`` (``index_put_``), never ``scatter_``: under
torch.compile, functionalisation turns an in-place ``scatter_`` on a graph input into an
out-of-place ``scatter`` plus a copy back, and inductor does not re-inplace ``scatter`` (it
does ``index_put``). The compiled step then wrote two new cache-sized buffers per layer,
attended over those copies and copied them back: about 4x the cache's bytes of extra memory
traffic every step, which dominated the dense model's decode step (its cache is ~5 GB at
batch 64 x 2048). tests/infer/test_decode_graph.py checks the compiled graph for
cache-sized temporaries.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.common import Attention, apply_rope, attend
from ..models.masks import CatLayout, cat_attention_mask
from .decode_attention import decode_attention
from .decode_block import fold_norm_weight, lean_block_forward, rope_attention

# Whether compile_step(lean=None) runs the lean blocks on CUDA: yes, since session 22. They are
# faster (+1.8% at chunk 8, batch 64, H100; +4% with folded norms, which stay opt-in for their
# memory; docs/benchmarks.md sessions 18, 20, 22) and the CUDA suites of the compiled step
# (cudagraph trees, runner graphs, attend buckets, aligned compression; both paths) passed with it:
#   pytest tests/infer/test_generate_cuda.py tests/infer/test_decode_graph.py tests/infer/test_decode_block.py
# False makes the model's ops the compiled default again (per call: --no-lean, lean=False).
LEAN_BY_DEFAULT = True


# ----------------------------------------------------------------------------------------
# the model's attention and blocks, split into "project", "attend", "output"
# ----------------------------------------------------------------------------------------
def project_qkv(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first half of ``Attention.forward``: x (B, S, D) -> q (B, Hq, S, hd), k/v (B, Hkv, S, hd).

    cos/sin are (S, n) for a shared layout or (B, 1, S, n) for per-row positions.
    The plain RoPE is used even where the model would call liger's (same function).
    """
    B, S, _ = x.shape
    hd, g = attn.head_dim, attn.group
    qkv = attn.wqkv(x).view(B, S, -1, (g + 2) * hd)  # (B, S, Hkv, (g+2)*hd)
    q, k, v = qkv.split([g * hd, hd, hd], dim=-1)
    q = q.reshape(B, S, -1, hd)  # (B, S, Hq, hd)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attn_output(attn: Attention, y: Tensor) -> Tensor:
    """y (B, Hq, S, hd) -> (B, S, D) through ``wo``."""
    B, H, S, hd = y.shape
    return attn.wo(y.transpose(1, 2).reshape(B, S, H * hd))


def block_forward(layer: nn.Module, x: Tensor, attention: Callable[[Tensor], Tensor],
                  gate_up: Optional[Tensor] = None) -> Tensor:
    """``TransformerBlock.forward`` with the attention call supplied by the caller; gate_up:
    the feed-forward's fused w1|w3 weight (``fuse_gate_up``) or None."""
    h = x + attention(layer.attention_norm(x))
    ff, u = layer.feed_forward, layer.ffn_norm(h)
    if gate_up is None:
        return h + ff(u)
    return h + ff.gated(*F.linear(u, gate_up).chunk(2, dim=-1))  # (B, S, 2F) -> 2 x (B, S, F)


_GATE_UP = "_cat_titan_gate_up"


def fuse_gate_up(ff: nn.Module) -> Optional[Tensor]:
    """A SwiGLU's w1 and w3 weights stored as the two halves of one (2F, D) tensor, which is
    returned: the parameters become views of it (no extra memory; the model computes what it
    did), and a decode step runs one GEMM for both. At batch 64 on an H200 (1536 -> 2 x
    4096, bf16) one GEMM takes 7.1 us against 2 x 5.2 us (tools/bench_attention.py --decode-gemms,
    docs/benchmarks.md). Idempotent; None where the weights are not plain tensors of one
    shape, dtype and device (DTensors under TP/FSDP). The state dict's w1 and w3 then share
    one storage: torch.save keeps that, safetensors' save_file refuses it (clone them first;
    cat_titan's export reads checkpoints, not live models)."""
    w1, w3 = ff.w1.weight, ff.w3.weight
    done = ff.__dict__.get(_GATE_UP)
    if done is not None and w1.data_ptr() == done.data_ptr() and w3.data_ptr() == done[w1.shape[0]:].data_ptr():
        return done
    if (type(w1.data) is not torch.Tensor or type(w3.data) is not torch.Tensor or w1.shape != w3.shape
            or w1.dtype != w3.dtype or w1.device != w3.device):
        return None
    fused = torch.cat([w1.detach(), w3.detach()])  # (2F, D)
    ff.w1.weight.data, ff.w3.weight.data = fused[: w1.shape[0]], fused[w1.shape[0]:]
    ff.__dict__[_GATE_UP] = fused  # not a parameter or buffer: state dicts are unchanged
    return fused


class KVCache(nn.Module):
    """K and V of one attention layer: (B, Hkv, N, hd) each, zero-initialised."""

    def __init__(self, attn: Attention, batch: int, length: int, dtype, device):
        super().__init__()
        hd = attn.head_dim
        heads = attn.wqkv.out_features // ((attn.group + 2) * hd)  # KV heads (local under TP)
        shape = (batch, heads, length, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def fill(self, k: Tensor, v: Tensor, src: Optional[Tensor] = None) -> None:
        """Prefill: column j of the cache <- position src[b, j] of k/v (B, H, S, hd);
        without src, the first S columns <- k/v."""
        if src is None:
            self.k[:, :, : k.shape[2]].copy_(k)
            self.v[:, :, : v.shape[2]].copy_(v)
            return
        idx = src[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, H, N, hd)
        self.k.copy_(k.gather(2, idx))
        self.v.copy_(v.gather(2, idx))

    def attend(self, attn: Attention, x: Tensor, cos: Tensor, sin: Tensor, cols: Tensor, lengths: Tensor,
               n_cols: Optional[int] = None) -> Tensor:
        """One decode step: x (B, T, D) -> (B, T, D). Writes each query's K/V at its column
        cols (B, T) first, then query (b, t) attends to columns [0, lengths[b, t]) (its own
        column included, so queries of one step see each other as their lengths say).
        n_cols: the cache's first n_cols columns only (every length lies within)."""
        q, k, v = project_qkv(attn, x, cos, sin)  # (B, H, T, hd)
        rows = _rows(cols)
        # In place under torch.compile too (index_put_, see the module docstring).
        self.k[rows, :, cols] = k.transpose(1, 2)  # (B, T, H, hd) into [b, :, cols[b, t]]
        self.v[rows, :, cols] = v.transpose(1, 2)
        keys, values = (self.k, self.v) if n_cols is None else (self.k[:, :, :n_cols], self.v[:, :, :n_cols])
        return attn_output(attn, decode_attention(q, keys, values, lengths))  # (B, Hq, T, hd) -> (B, T, D)

    @property
    def columns(self) -> int:
        return self.k.shape[2]


class CatColumns:
    """Column bookkeeping of a column-causal CAT cache (see the module docstring)::

        [fx_0 .. fx_k | sep_k | tokens of chunk k | stale .. | scratch]
    """

    def __init__(self, max_len: int, chunk_size: int, with_sep: bool, scratch: bool):
        self.chunk_size = C = chunk_size
        self.stride = 2 if with_sep else 1  # fx_k's column + stride = column of chunk k's token 0
        n = max_len // C + self.stride + C  # past the largest column any query of max_len tokens uses
        self.scratch = n if scratch else -1
        self.length = n + (1 if scratch else 0)

    def prefill_sources(self, layout: CatLayout, lengths: Tensor) -> Tensor:
        """For each row and cache column, the decoder position of a prefill over ``layout``
        whose K/V belongs there: (B, N). A row whose next token is in chunk k (k = length
        // C) gets fx_0..fx_k, sep_k and the prompt's tokens of chunk k; the columns after
        them get some in-range position (finite values, invisible until overwritten)."""
        C, s = self.chunk_size, self.stride
        col = torch.arange(self.length, device=lengths.device)[None]  # (1, N)
        k = (lengths // C)[:, None]  # (B, 1)
        fx = layout.slot_start + col * s
        sep = layout.slot_start + k * s + 1
        tok = layout.token_start + k * C + (col - k - s)
        src = torch.where(col <= k, fx, torch.where(col >= k + s, tok, sep))  # (B, N)
        return src.clamp(0, layout.length - 1)


def step_queries(pos: Tensor, cols: CatColumns, completes: bool, rope_base: int):
    """The one query each row sends through a CAT cache at position pos (B,).

    A row whose token ends its chunk k (phase C-1) sends the slot fx_{k+1} (column k+1,
    RoPE id 0) instead of the token. Returns (done (B,) bool or None, col, rope), each
    (B,); the query sees columns [0, col]; rope_base is the RoPE id of a chunk's first
    token (1, or 2 with seps).
    """
    C = cols.chunk_size
    phase, k = pos % C, pos // C
    col, rope = k + cols.stride + phase, rope_base + phase
    if not completes:
        return None, col, rope
    done = phase == C - 1
    return done, torch.where(done, k + 1, col), torch.where(done, 0, rope)


def _rows(index: Tensor) -> Tensor:
    """(B, 1) row numbers, to pair with per-row column indices (B, T) in an indexed write."""
    return torch.arange(index.shape[0], device=index.device)[:, None]


def _rope_at(table, ids: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE tables at per-row ids (B, T) -> (B, 1, T, n) each (broadcast over heads)."""
    return table.cos[ids][:, None], table.sin[ids][:, None]


# ----------------------------------------------------------------------------------------
# runners
# ----------------------------------------------------------------------------------------
class Runner(nn.Module):
    """Caches plus the two passes. ``prefill`` takes right-padded prompts (B, Lp) and their
    lengths (B,) and returns the logits (B, V) after each prompt; ``step`` feeds one token
    per row at positions ``pos`` (B,) and returns the next logits (B, V)."""

    model: nn.Module
    chunk_size: int = 0

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        super().__init__()
        self.batch, self.max_len = batch, max_len
        # Not a submodule: the runner's state is its caches, the weights stay the model's.
        object.__setattr__(self, "model", model)
        # Compiled functions are of the unbound methods (self is an argument): no reference
        # cycle keeps a runner's caches alive, and runners of equal shapes share graphs.
        self._compiled: dict[str, Callable] = {}
        self._cuda_graphs = False
        self._graphs: Optional[dict] = None  # mode="graphs": step variant -> (CUDA graph, static args, output)
        self._graph_pool = None
        # Per layer, the feed-forward's fused w1|w3 weight (fuse_weights; compile_step on CUDA).
        self._gate_up: list[Optional[Tensor]] = [None] * len(model.layers)
        # Per layer, how its block runs in a decode step: "ops" (the model's modules) or "lean"
        # (decode_block.py, lean_linears).
        self._path: list[str] = ["ops"] * len(model.layers)
        # fold_norms=True: per layer, wqkv and w1|w3 with their norm's weight
        # folded in (fold_norm_weight); refreshed when a source tensor changes.
        self._folded_qkv: list[Optional[Tensor]] = [None] * len(model.layers)
        self._folded_gate_up: list[Optional[Tensor]] = [None] * len(model.layers)
        self._fold_sources: Optional[tuple] = None  # (data_ptr, _version) of every folded source

    def fuse_weights(self) -> None:
        """Run each feed-forward's w1 and w3 as one GEMM in the decode step (``fuse_gate_up``;
        it rewrites the model's w1/w3 parameters as views of one tensor). compile_step does
        this on CUDA."""
        self.refresh_gate_up(force=True)

    def refresh_gate_up(self, force: bool = False) -> None:
        """Re-fuse the feed-forward weights of a fused runner (``fuse_gate_up``); a generation
        calls it before its prefill, so weights replaced since (``param.data = ...``) are
        fused again and the captured graphs, which read the old tensors, are dropped."""
        if not force and all(g is None for g in self._gate_up):
            return  # never fused (or nothing fusable)
        new = [fuse_gate_up(layer.feed_forward) for layer in self.model.layers]
        if any(a is not b for a, b in zip(new, self._gate_up)):
            self._gate_up[:] = new  # same list object: compiled steps read its entries
            # a layer whose weights stopped being fusable (made DTensors) returns to the model's ops
            self._path[:] = [p if g is not None else "ops" for p, g in zip(self._path, new)]
            if self._graphs:
                self._graphs.clear()
        if self._fold_sources is not None:
            self._fold()

    def _fold_inputs(self) -> list[tuple[str, int, Tensor, Tensor]]:
        """(kind, layer, weight, norm weight) of every linear the lean step runs folded."""
        out = []
        for i, layer in enumerate(self.model.layers):
            if self._path[i] != "ops":
                out.append(("qkv", i, layer.attention.wqkv.weight, layer.attention_norm.weight))
                out.append(("gate_up", i, self._gate_up[i], layer.ffn_norm.weight))
        return out

    def _clear_folded(self) -> None:
        self._folded_qkv[:] = [None] * len(self._folded_qkv)  # same list objects: compiled steps read them
        self._folded_gate_up[:] = [None] * len(self._folded_gate_up)
        self._fold_sources = None

    def _fold(self) -> None:
        """(Re)compute the folded weights if any source tensor was replaced or changed in place
        since they were made (its data pointer or version counter moved)."""
        inputs = self._fold_inputs()
        sources = tuple((t.data_ptr(), t._version) for _, _, w, g in inputs for t in (w, g))
        if sources == self._fold_sources:
            return
        self._clear_folded()
        with torch.no_grad():
            for kind, i, w, g in inputs:
                f = fold_norm_weight(w.detach(), g.detach())
                if kind == "qkv":
                    self._folded_qkv[i] = f
                else:
                    self._folded_gate_up[i] = f
        self._fold_sources = sources
        if self._graphs:
            self._graphs.clear()

    def lean_linears(self, fold_norms: bool = False) -> list[bool]:
        """Run each decode step's blocks as the lean path (decode_block.py): cuBLAS matmuls,
        RoPE + cache writes + attention as one kernel, the residual adds inside the wo and w2
        GEMMs. fold_norms: wqkv and w1|w3 use copies with their norm's weight folded in (extra
        memory of those weights), which removes the two norm kernels of a block. For blocks of
        plain attention (no q/k norm) whose w1 and w3 ``fuse_gate_up`` can fuse; the others keep
        the model's ops. Off CUDA the same code runs the reference ops. The captured graphs and
        folded weights are redone. Returns which layers are lean. Call before ``compile_step``."""
        self.fuse_weights()
        self._path[:] = ["lean" if self._can_run_lean(layer) and g is not None else "ops"
                         for layer, g in zip(self.model.layers, self._gate_up)]
        if self._graphs:
            self._graphs.clear()
        self._clear_folded()
        if fold_norms:
            self._fold()
        return [p == "lean" for p in self._path]

    @property
    def decode_paths(self) -> tuple[str, ...]:
        """Per layer, how its block runs in a decode step: 'ops' or 'lean'."""
        return tuple(self._path)

    @staticmethod
    def _can_run_lean(layer: nn.Module) -> bool:
        attn = layer.attention
        return type(attn) is Attention and attn.q_norm is None

    def _block(self, i: int, layer: nn.Module, x: Tensor, attention: Callable[[Tensor], Tensor],
               attend_lean: Optional[Callable[..., Tensor]]) -> Tensor:
        """Layer i of a decode step: lean (``lean_linears``; attend_lean: its attention) or as the
        model's ops (attention)."""
        if self._path[i] == "lean":
            return lean_block_forward(layer, x, attend_lean, self._gate_up[i], self._folded_qkv[i],
                                      self._folded_gate_up[i])
        return block_forward(layer, x, attention, self._gate_up[i])

    # Both passes run on the host's knowledge of positions (pos_host, a CPU tensor equal to
    # pos) to choose the traced variant without a device sync.
    def step(self, tok: Tensor, pos: Tensor, pos_host: Tensor) -> Tensor:
        raise NotImplementedError

    def prefill(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode_impl(self, *args):
        raise NotImplementedError

    def _decode(self, *args):
        fn = self._compiled.get("decode", type(self)._decode_impl)
        out = self._replay(fn, args) if self._graphs is not None else fn(self, *args)
        # A CUDA graph's output buffer is overwritten by its next replay; callers keep logits.
        return out.clone() if self._cuda_graphs else out

    def _replay(self, fn: Callable, args: tuple) -> Tensor:
        """mode='graphs': the step variant of ``args`` (its flags, and which tensors are given)
        as a plain CUDA graph. A new variant is captured once: its tensor arguments are copied
        into static buffers, the compiled step runs twice on a side stream (compilation and
        library set-up stay out of the capture; a step's writes depend only on its inputs, so
        repeating it changes nothing), then it is captured. Later calls copy the arguments in
        and replay: no guards, no per-call bookkeeping on the host."""
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, Tensor) else a for a in args)
        entry = self._graphs.get(key)
        if entry is None:
            static = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(self, *static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = fn(self, *static)
            entry = self._graphs[key] = (graph, static, out)
        graph, static, out = entry
        for dst, src in zip(static, args):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        graph.replay()
        return out

    def compile_step(self, mode: Optional[str] = None, autotune: bool = False, lean: Optional[bool] = None,
                     **kw) -> None:
        """Compile the decode step (static shapes; one graph per step variant).

        mode='reduce-overhead': torch.compile's CUDA graphs (cudagraph trees; the caches are
        marked as static addresses). mode='graphs' (CUDA only): torch.compile without its
        CUDA graphs, each step variant captured by the runner itself (``_replay``), which
        skips dynamo's guards and the cudagraph trees' checks on every step.
        autotune: inductor's max-autotune (times Triton GEMM templates against cuBLAS for each
        of the step's matmul shapes; longer compilation).
        lean: when no decode path was chosen before (every block on the model's ops), run the
        blocks as the lean path (``lean_linears``, no folded norms). None: on CUDA if
        ``LEAN_BY_DEFAULT``; False: keep the model's ops."""
        if autotune and mode not in (None, "graphs", "reduce-overhead"):
            raise ValueError(f"autotune=True sets the compile mode itself; got mode={mode!r}")
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            self.fuse_weights()
        if (lean or (lean is None and LEAN_BY_DEFAULT and device.type == "cuda")) and all(
                p == "ops" for p in self._path):
            self.lean_linears()
        if mode == "graphs":
            if device.type != "cuda":
                raise ValueError(f"compile_step(mode='graphs') captures CUDA graphs, but the model is on {device}; "
                                 f"use mode=None (torch.compile only) off CUDA")
            self._graphs, self._graph_pool = {}, torch.cuda.graph_pool_handle()
            self._cuda_graphs, mode = True, None
        if mode == "reduce-overhead":
            self._cuda_graphs = True
            for buf in self.buffers():
                torch._dynamo.mark_static_address(buf)
        # Graphs are per code object: every runner of a class (each chunk size of an adaptive
        # CAT, each batch) adds its variants to the same count. Past dynamo's limit (8) a new
        # variant would silently run eagerly.
        from torch._dynamo import config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        if autotune:
            mode = "max-autotune" if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
        self._compiled["decode"] = torch.compile(type(self)._decode_impl, mode=mode, dynamic=False, **kw)

    def completes(self, pos_host: Tensor) -> bool:
        """Does some row feed the last token of a chunk at these positions?"""
        C = self.chunk_size
        return C > 0 and bool(((pos_host % C) == C - 1).any())

    def caches(self) -> list[KVCache]:
        return [m for m in self.modules() if isinstance(m, KVCache)]

    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _head(self, h: Tensor) -> Tensor:
        """Output head on one position per row: (B, D) -> (B, V)."""
        return self.model.head(h[:, None])[:, 0]


class CatRunner(Runner):
    """Fixed and adaptive CATs: the decoder caches only slots + the current chunk.

    Besides the K/V, each row keeps its current chunk's token ids (B, C) for the compressor.
    When every row completes its chunk at the same step (equal prompt lengths, the usual
    batch), the compressor runs inside the compiled decode step (one graph, one CUDA graph
    replay); otherwise the completing rows are compressed first and their slots passed in.
    An adaptive CAT's output projection resized to C (a bilinear interpolation of the whole
    ``proj_fx`` weight, which the model's forward recomputes every call) is computed once per
    generation, at the prefill.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, chunk_size: int, dtype, device):
        super().__init__(model, batch, max_len)
        self.chunk_size = C = chunk_size
        self.adaptive = model.adaptive
        self.size_index = C.bit_length() - 1 if self.adaptive else 0  # log2(C): the size token / cond row
        self.cols = CatColumns(max_len, C, self.adaptive, scratch=self.adaptive)
        self.kv = nn.ModuleList(KVCache(layer.attention, batch, self.cols.length, dtype, device)
                                for layer in model.layers)
        self.register_buffer("chunk", torch.zeros(batch, C, dtype=torch.long, device=device), persistent=False)
        comp = model.compressor
        self.resized_proj = self.adaptive and C != model.args.chunk_size
        if self.resized_proj:
            shape = (comp.proj_fx.weight.shape[0], C * comp.args.compressor_dim)
            self.register_buffer("proj", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def compile_step(self, mode: Optional[str] = None, **kw) -> None:
        super().compile_step(mode, **kw)
        # Rows completing a chunk vary in number (mixed prompt lengths): dynamic batch.
        self._compiled["compress"] = torch.compile(CatRunner._compress_impl, dynamic=True)

    def _compress(self, chunks: Tensor, chunk_index: Tensor) -> Tensor:
        return self._compiled.get("compress", CatRunner._compress_impl)(self, chunks, chunk_index)

    # -- prefill ------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        m, C = self.model, self.chunk_size
        B, Lp = tokens.shape  # Lp: a multiple of C
        if self.resized_proj:
            self.proj.copy_(m.compressor.proj_weight(C))  # (dim_fx, C * Dc)
        x, layout = m.decoder_inputs(tokens, C)  # (B, S, D): [tokens | slots | pad]
        tables = layout.tables(x.device)
        cos, sin = m.rope.gather(tables.rope_pos)
        mask = cat_attention_mask(layout, m.args.attn_backend, x.device)
        src = self.cols.prefill_sources(layout, lengths)  # (B, N)
        for layer, cache in zip(m.layers, self.kv):
            def attention(u, layer=layer, cache=cache):
                q, k, v = project_qkv(layer.attention, u, cos, sin)
                cache.fill(k, v, src)
                return attn_output(layer.attention, attend(q, k, v, mask))
            x = block_forward(layer, x, attention)
        # Each row's current chunk (ids past the prompt are pad, overwritten before use).
        idx = ((lengths // C) * C)[:, None] + torch.arange(C, device=tokens.device)  # (B, C)
        self.chunk.copy_(tokens.gather(1, idx.clamp(max=Lp - 1)))
        last = tables.out_index[lengths - 1]  # (B,) decoder position predicting the next token
        return self._head(x[torch.arange(B, device=x.device), last])

    # -- decode ---------------------------------------------------------------------------
    def _compress_impl(self, chunks: Tensor, chunk_index: Tensor) -> Tensor:
        """``Compressor.forward`` for one chunk per row at its own chunk index:
        chunks (n, C) ids, chunk_index (n,) -> fx (n, D)."""
        comp = self.model.compressor
        n, C = chunks.shape
        dim = comp.args.compressor_dim
        x = comp.tok_embeddings(chunks)  # (n, C, Dc)
        prefix = [comp.chunk_pos(chunk_index)[:, None]]  # (n, 1, Dc)
        if comp.adaptive:
            prefix.insert(0, comp.size_tokens.weight[self.size_index].view(1, 1, dim).expand(n, 1, dim))
        x = torch.cat(prefix + [x], dim=1)  # (n, P+C, Dc)
        rope = comp.rope.first(x.shape[1])
        for layer in comp.layers:
            x = layer(x, rope, "full")
        x = comp.norm(x)[:, comp.n_prefix:].reshape(n, C * dim)  # (n, C*Dc)
        return F.linear(x, self.proj if self.resized_proj else comp.proj_weight(C))  # (n, D)

    def _write_chunk(self, tok: Tensor, pos: Tensor) -> None:
        self.chunk[_rows(pos), (pos % self.chunk_size)[:, None]] = tok[:, None]  # (B, 1) into (B, C)

    def step(self, tok: Tensor, pos: Tensor, pos_host: Tensor) -> Tensor:
        C = self.chunk_size
        if not self.completes(pos_host):
            return self._decode(tok, pos, None, False)
        done_host = (pos_host % C) == C - 1
        if bool(done_host.all()):  # aligned batches: every row at once, compressed inside the step
            return self._decode(tok, pos, None, True)
        self._write_chunk(tok, pos)
        rows = done_host.nonzero().flatten().to(pos.device, non_blocking=True)
        part = self._compress(self.chunk.index_select(0, rows), pos.index_select(0, rows) // C)
        fx = part.new_zeros(tok.shape[0], part.shape[1]).index_copy(0, rows, part)  # (B, D)
        return self._decode(tok, pos, fx, False)

    def _decode_impl(self, tok: Tensor, pos: Tensor, fx: Optional[Tensor], compress_all: bool) -> Tensor:
        """tok, pos (B,); fx (B, D) for rows that complete a chunk (None when none does, or
        when every row does: compress_all compresses the whole batch here)."""
        m = self.model
        self._write_chunk(tok, pos)  # (again, when step() already wrote it for a partial compression)
        if compress_all:
            fx = self._compress_impl(self.chunk, pos // self.chunk_size)  # (B, D)
        x_tok = m.tok_embeddings(tok)  # (B, D)
        done, col, rope = step_queries(pos, self.cols, fx is not None, self.cols.stride)
        x = x_tok if done is None else torch.where(done[:, None], fx, x_tok)
        queries = [(x, col, rope, col + 1)]
        if done is not None and self.adaptive:
            # Second query: sep_{k+1} for completing rows, right after fx_{k+1} (written by
            # query 0 of this step); for the others a dummy that writes to the scratch
            # column and sees column 0 (its output is dropped).
            sep = m.separator.weight.expand_as(x_tok)
            queries.append((torch.where(done[:, None], sep, x_tok), torch.where(done, col + 1, self.cols.scratch),
                            torch.where(done, 1, 0), torch.where(done, col + 2, 1)))
        x, col, rope, lengths = (torch.stack(t, dim=1) for t in zip(*queries))  # (B, T, ...)
        cos, sin = _rope_at(m.rope, rope)
        B, T = col.shape
        flat = (cos.reshape(B * T, -1), sin.reshape(B * T, -1), col.reshape(-1), lengths.reshape(-1))  # rows b*T+t
        for i, (layer, cache) in enumerate(zip(m.layers, self.kv)):
            x = self._block(i, layer, x,
                            lambda u, a=layer.attention, cache=cache: cache.attend(a, u, cos, sin, col, lengths),
                            lambda qkv, h, layer=layer, cache=cache: rope_attention(
                                qkv, cache.k, cache.v, *flat, T, layer.attention.group, h, layer.attention_norm.eps))
        if x.shape[1] == 1:
            return self._head(x[:, 0])
        # adaptive with completions: the sep query predicts for completing rows
        return self._head(torch.where(done[:, None], x[:, 1], x[:, 0]))


class StackRunner(Runner):
    """Dense transformers and CAT-layer stacks (pure or hybrid): per-layer caches.

    Dense layers keep full K/V by position. A CAT layer keeps its inner attention's
    slots + current chunk, and its current chunk's normed hidden states (B, C, D): its
    slot fx_{k+1} = compress(normed inputs of chunk k at this layer) needs all C of them.

    ``attend_bucket``: dense layers attend over the first ``ceil((max pos + 1) / bucket) *
    bucket`` cache columns instead of all ``max_len``. Only the SDPA path (off CUDA) gains:
    it reads every column it is given, while the CUDA kernel already stops at each query's
    visible length. Each bucket is a separate compiled graph (the length is static), so the
    compile cost grows with max_len / bucket; None (default) attends over the whole cache.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, chunk_size: int, dtype, device,
                 attend_bucket: Optional[int] = None):
        super().__init__(model, batch, max_len)
        if attend_bucket is not None and attend_bucket < 1:
            raise ValueError(f"attend_bucket={attend_bucket} must be >= 1 (or None: the whole cache)")
        self.attend_bucket = attend_bucket
        a = model.args
        self.kinds = list(getattr(model, "kinds", ["dense"] * len(model.layers)))
        self.chunk_size = C = chunk_size if "cat" in self.kinds else 0
        # A padded prefill may reach past max_len by < C positions: dense caches take it.
        self.dense_len = -(-max_len // C) * C if C else max_len
        self.cols = CatColumns(max_len, C, False, scratch=False) if C else None
        caches, hidden = [], []
        for kind, layer in zip(self.kinds, model.layers):
            if kind == "dense":
                caches.append(KVCache(layer.attention, batch, self.dense_len, dtype, device))
                hidden.append(None)
            else:
                caches.append(KVCache(layer.attention.inner, batch, self.cols.length, dtype, device))
                hidden.append(torch.zeros(batch, C, a.dim, dtype=dtype, device=device))
        self.kv = nn.ModuleList(caches)
        for i, h in enumerate(hidden):
            if h is not None:
                self.register_buffer(f"hidden{i}", h, persistent=False)

    def _hidden(self, i: int) -> Tensor:
        return getattr(self, f"hidden{i}")

    # -- prefill ------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        m, C = self.model, self.chunk_size
        B, Lp = tokens.shape  # Lp: a multiple of C when there are CAT layers
        x = m.tok_embeddings(tokens)  # (B, Lp, D)
        dense_rope = m.rope.first(Lp)
        if C:
            layout = CatLayout(Lp, C, False, m.decoder_pad_multiple)
            tables = layout.tables(x.device)
            mask = cat_attention_mask(layout, m.args.attn_backend, x.device)
            cat_cos, cat_sin = m.cat_rope.gather(tables.rope_pos)
            src = self.cols.prefill_sources(layout, lengths)  # (B, N)
            pad = layout.length - layout.real_len
            # Positions of each row's partial last chunk, for the CAT layers' hidden buffers.
            chunk_idx = (((lengths // C) * C)[:, None] + torch.arange(C, device=x.device)).clamp(max=Lp - 1)
        for i, (kind, layer, cache) in enumerate(zip(self.kinds, m.layers, self.kv)):
            if kind == "dense":
                def attention(u, layer=layer, cache=cache):
                    q, k, v = project_qkv(layer.attention, u, *dense_rope)
                    cache.fill(k, v)
                    return attn_output(layer.attention, attend(q, k, v, None))
            else:
                def attention(u, i=i, layer=layer, cache=cache):
                    # CatAttention.forward, keeping the inner K/V and the chunk's inputs
                    ca = layer.attention
                    D = u.shape[-1]
                    h = ca.sequence(u, pad)  # (B, S, Dfx)
                    q, k, v = project_qkv(ca.inner, h, cat_cos, cat_sin)
                    cache.fill(k, v, src)
                    self._hidden(i).copy_(u.gather(1, chunk_idx[..., None].expand(-1, -1, D)))
                    y = attn_output(ca.inner, attend(q, k, v, mask)).index_select(1, tables.out_index)
                    return ca.final_proj(y)  # (B, Lp, D)
            x = block_forward(layer, x, attention)
        return self._head(x[torch.arange(B, device=x.device), lengths - 1])

    # -- decode ---------------------------------------------------------------------------
    def attend_len(self, pos_host: Tensor) -> Optional[int]:
        """Dense cache columns this step attends over (None: all of them)."""
        b = self.attend_bucket
        if not b:
            return None
        return min(self.dense_len, -(-(int(pos_host.max()) + 1) // b) * b)

    def step(self, tok: Tensor, pos: Tensor, pos_host: Tensor) -> Tensor:
        return self._decode(tok, pos, self.completes(pos_host), self.attend_len(pos_host))

    def _decode_impl(self, tok: Tensor, pos: Tensor, completes: bool, n_dense: Optional[int] = None) -> Tensor:
        m = self.model
        x = m.tok_embeddings(tok)[:, None]  # (B, 1, D)
        dense_col = pos[:, None]  # (B, 1)
        dense_len = dense_col + 1  # (B, 1): a query sees the positions up to its own
        dense_cos, dense_sin = _rope_at(m.rope, dense_col)
        if self.chunk_size:
            done, col, rope = step_queries(pos, self.cols, completes, 1)
            cat_len = (col + 1)[:, None]  # (B, 1)
            cat_cos, cat_sin = _rope_at(m.cat_rope, rope[:, None])
            hidden_rows, hidden_phase = _rows(pos), (pos % self.chunk_size)[:, None]  # (B, 1) each
        for i, (kind_i, layer, cache) in enumerate(zip(self.kinds, m.layers, self.kv)):
            if kind_i == "dense":
                def attention(u, layer=layer, cache=cache):
                    return cache.attend(layer.attention, u, dense_cos, dense_sin, dense_col, dense_len, n_dense)

                def attend_lean(qkv, h, layer=layer, cache=cache):
                    k, v = (cache.k, cache.v) if n_dense is None else (cache.k[:, :, :n_dense], cache.v[:, :, :n_dense])
                    return rope_attention(qkv, k, v, dense_cos[:, 0, 0], dense_sin[:, 0, 0], pos, pos + 1, 1,
                                          layer.attention.group, h, layer.attention_norm.eps)
            else:
                def attention(u, i=i, layer=layer, cache=cache):
                    ca = layer.attention
                    buf = self._hidden(i)
                    buf[hidden_rows, hidden_phase] = u  # (B, 1, D) into (B, C, D): the chunk's normed inputs so far
                    h = ca.expand(u)  # (B, 1, Dfx)
                    if done is not None:
                        fx = ca.compress(buf.reshape(buf.shape[0], 1, -1))  # (B, 1, Dfx)
                        h = torch.where(done[:, None, None], fx, h)
                    return ca.final_proj(cache.attend(ca.inner, h, cat_cos, cat_sin, col[:, None], cat_len))
                attend_lean = None  # CAT layers keep the model's ops (_can_run_lean)
            x = self._block(i, layer, x, attention, attend_lean)
        return self._head(x[:, 0])


def make_runner(model: nn.Module, batch: int, max_len: int, chunk_size: int,
                attend_bucket: Optional[int] = None) -> Runner:
    """The runner for a model's kind, with caches for ``batch`` rows of up to ``max_len``
    tokens, in the model's dtype and on its device. ``attend_bucket``: see StackRunner (dense
    and hybrid models' dense layers; a CAT's caches are short and ignore it)."""
    p = next(model.parameters())
    if model.args.kind in ("cat", "cat_adaptive"):
        return CatRunner(model, batch, max_len, chunk_size, p.dtype, p.device)
    return StackRunner(model, batch, max_len, chunk_size, p.dtype, p.device, attend_bucket=attend_bucket)
