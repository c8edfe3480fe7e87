#!/usr/bin/env bash
# The reference implementation's own generation benchmark, at issue 7's batch, on this machine: the
# baseline that tools/bench_generate.py's numbers are compared with, measured in the same job.
#
#   bash tools/experiments/reference_harness/run_reference.sh REF_CHECKOUT [BATCH] [CHUNK ...]
#
# REF_CHECKOUT: a clone of github.com/rajesh-lab/cat-transformer (its benchmark.py, transformer.py and
# cat_transformer.py; it needs CUDA, einops, pandas, tqdm, transformers and liger-kernel importable).
# BATCH defaults to 64 and the chunk sizes to 8 32 (issue 7's configuration). Nothing of the reference is
# kept in this repository: its three files are copied into a temporary directory, and `sed` sets the batch
# size, the chunk size and the CSV name in the copy of benchmark.py (its other settings are kept: decoder
# 1536x12/24 heads, compressor 768x3, block 2048, bf16, torch.compile with CUDA graphs, 3 warm-up and
# 3 timed runs). The harness generates block - chunk tokens per row from a chunk-long prompt; tokens/s
# is batch x those tokens / the mean latency it reports (docs/benchmarks.md, session 25).
set -euo pipefail
ref=${1:?usage: run_reference.sh REF_CHECKOUT [BATCH] [CHUNK ...]}
batch=${2:-64}
shift $(( $# < 2 ? $# : 2 ))
chunks=("$@")
[ ${#chunks[@]} -gt 0 ] || chunks=(8 32)
for f in benchmark.py transformer.py cat_transformer.py; do
    if [ ! -f "$ref/$f" ]; then
        echo "$ref/$f not found: REF_CHECKOUT must be a clone of rajesh-lab/cat-transformer" >&2; exit 2
    fi
done
[[ $batch =~ ^[1-9][0-9]*$ ]] || { echo "BATCH=$batch must be a positive integer" >&2; exit 2; }
for c in "${chunks[@]}"; do
    if ! [[ $c =~ ^[1-9][0-9]*$ ]] || (( 2048 % c )); then
        echo "chunk size $c must divide the harness's block 2048 (e.g. 8, 16, 32)" >&2; exit 2
    fi
done
# The lines the substitutions expect; a changed harness stops here instead of running another configuration.
for line in '    batch_size = 320' '    chunk_size = 8' '    benchmark_name = "temp"'; do
    if ! grep -qxF "$line" "$ref/benchmark.py"; then
        echo "$ref/benchmark.py has no line '$line'; update this script" >&2; exit 2
    fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$ref/transformer.py" "$ref/cat_transformer.py" "$work/"
for c in "${chunks[@]}"; do
    sed -e "s/^    batch_size = 320\$/    batch_size = $batch/" -e "s/^    chunk_size = 8\$/    chunk_size = $c/" \
        -e "s/^    benchmark_name = \"temp\"\$/    benchmark_name = \"ref_c$c\"/" -e "s/^    print(model)\$/    pass/" \
        "$ref/benchmark.py" > "$work/bench_c$c.py"
    (cd "$work" && python3 "bench_c$c.py" > "log_c$c.txt" 2>&1) || { tail -20 "$work/log_c$c.txt" >&2; exit 1; }
    grep "^Latency" "$work/log_c$c.txt"
    python3 - "$work/ref_c$c.csv" <<'PY'
import csv, sys
r = list(csv.DictReader(open(sys.argv[1])))[-1]
b, block, c, ms = int(r["batch_size"]), int(r["block_size"]), int(r["chunk_size"]), float(r["latency"])
n = b * (block - c)
print(f"reference harness, chunk {c}, batch {b}: {n} tokens in {ms:.1f} ms (mean of its 3 runs) = "
      f"{n / ms * 1e3:,.0f} tokens/s, peak {float(r['mem_taken']):.2f} GiB")
PY
done
