"""A small CLIP to train with each masking mode: the model (``model``), its
data (``data``), the trainer (``python -m bench.clip.train``) and the training
throughput benchmark (``python -m bench.clip.throughput``)."""
