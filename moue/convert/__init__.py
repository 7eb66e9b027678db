"""Checkpoint conversion: Hugging Face MoE checkpoints in and out (``moue-convert``)."""
