"""Corpus readers, tokenizers and preprocessing to Megatron indexed datasets (issue 4)."""
