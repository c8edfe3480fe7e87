from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def debug_cat_config(run_dir, steps: int, *extra: str):
    """configs/debug_cat.yaml shrunk to a few CPU steps with no checkpoints, metrics files only,
    micro-batches of 2 out of 4 (two accumulated micro-steps), plus ``extra`` overrides."""
    from cat_titan.config import load_config

    return load_config(str(ROOT / "configs" / "debug_cat.yaml"), [
        f"job.run_dir={run_dir}", f"training.steps={steps}", "data.seq_len=64", "training.global_batch=4",
        "training.micro_batch=2", "training.sample_tokens=0", "metrics.tensorboard=false",
        "data.corpus_max_bytes=300000", "checkpoint.interval=0", "checkpoint.save_final=false", *extra])
