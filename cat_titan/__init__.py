"""cat_titan: distributed pretraining for Compress-And-Attend Transformers (CATs)."""

__version__ = "0.1.0"
