"""cat_titan: distributed pretraining for Compress-And-Attend Transformers (CATs)."""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu", dtype=None):
    """Rebuild a trained model from an exported ``.safetensors`` file alone (see
    ``cat_titan.export``; tools/export.py writes them), or from a checkpoint / run directory.

    Imported lazily so that ``import cat_titan`` stays cheap.
    """
    from .export import load_pretrained as _load_pretrained

    return _load_pretrained(path, device=device, dtype=dtype)


__all__ = ["__version__", "load_pretrained"]
