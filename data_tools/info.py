"""What a preprocessed dataset holds: documents, tokens, length histogram, tokenizer."""

from __future__ import annotations

import numpy as np

from data_tools.megatron_data import read_lengths, read_meta


def dataset_info(prefix: str) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lengths = read_lengths(prefix, "prefix")  # refuses a missing, damaged or truncated dataset
    ds = IndexedDataset(prefix)
    edges = [0] + [2**k for k in range(4, 21, 2)] + [np.inf]
    counts, _ = np.histogram(lengths, bins=edges)
    meta = read_meta(prefix) or {}
    return {
        "prefix": prefix,
        "documents": len(ds.document_indices) - 1,
        "tokens": int(lengths.sum()),
        "tokens_per_document": {"mean": float(lengths.mean()) if len(lengths) else 0.0,
                                "max": int(lengths.max()) if len(lengths) else 0},
        "length_histogram": {f"<{int(hi) if hi != np.inf else 'inf'}": int(c)
                             for hi, c in zip(edges[1:], counts, strict=True)},
        "dtype": str(ds.index.dtype.__name__),
        "tokenizer": meta.get("tokenizer"),
        "append_eod": meta.get("append_eod"),
    }
