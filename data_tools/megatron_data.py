"""Datasets for training, built by Megatron-Core's ``BlendedMegatronDatasetBuilder``.

- ``mock=True``: Megatron's ``MockGPTDataset`` - synthetic token sequences, no files (tests, dry
  runs, smoke runs).
- otherwise a blend: weighted preprocessed datasets (``moue-preprocess`` prefixes) split into
  train/valid/test by Megatron's ``GPTDataset``. Each dataset's recorded tokenizer
  (``PREFIX.meta.json``) must match the run's: a mismatch is an error, not silent garbage.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from data_tools.tokenizer import Tokenizer
from parallel.errors import UserError


class MegatronTokenizer(MegatronTokenizerBase):
    """What Megatron's datasets need of a tokenizer: vocabulary size, end-of-document id, and -
    when one is given - the text tokenizer behind them."""

    def __init__(self, vocab_size: int, eod: int = 0, text: Tokenizer | None = None):
        super().__init__(path="", config={})
        self._vocab_size, self._eod, self._text = vocab_size, eod, text

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> MegatronTokenizer:
        return cls(tokenizer.vocab_size, tokenizer.eod, tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab(self):
        return {}

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Identifies the tokenizer in the datasets' cache hash."""
        ids = {"cls": type(self).__qualname__, "vocab_size": self._vocab_size, "eod": self._eod}
        if self._text is not None:
            ids.update({k: str(v) for k, v in self._text.describe().items()})
        return OrderedDict(ids)

    def tokenize(self, text):
        if self._text is None:
            raise NotImplementedError("mock data has no text: use a real tokenizer to encode text")
        return self._text.encode(text).tolist()

    def detokenize(self, ids):
        if self._text is None:
            raise NotImplementedError("mock data has no text: use a real tokenizer to decode ids")
        return self._text.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("no chat templates in pretraining data")


def read_lengths(prefix: str, what: str = "data.path") -> np.ndarray:
    """The sequence lengths of an indexed dataset, after checking that its files are whole: the
    ``.idx`` is a Megatron index and the ``.bin`` holds every token the index points to. Errors
    name ``what`` (the config field or command argument), the file and the fix."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    for suffix in (".bin", ".idx"):
        if str(prefix).endswith(suffix):
            raise UserError(f"{what}={prefix}: give the dataset prefix, without {suffix} "
                            f"({what}={str(prefix)[:-len(suffix)]})")
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    missing = [p.name for p in (bin_, idx) if not p.is_file()]
    if missing:
        raise UserError(f"{what}={prefix}: no dataset there ({' and '.join(missing)} missing); "
                        "run moue-preprocess to make one, or set data.mock=true")
    with open(idx, "rb") as f:
        header = f.read(len(_INDEX_HEADER))
    if header != _INDEX_HEADER:  # checked here: Megatron's reader fails half-built, noisily
        raise UserError(f"{idx}: not a readable Megatron index (it does not start with "
                        f"{_INDEX_HEADER!r}); it is damaged or of another format: run "
                        "moue-preprocess again")
    try:
        dataset = IndexedDataset(str(prefix))
        lengths = np.asarray(dataset.sequence_lengths).copy()
        pointers = np.asarray(dataset.index.sequence_pointers)
        end = int(pointers[-1]) + int(lengths[-1]) * dataset.index.dtype_size if len(lengths) else 0
        del dataset
    except Exception as err:  # Megatron asserts on a bad header, numpy on a short index
        raise UserError(f"{idx}: not a readable Megatron index ({type(err).__name__}: "
                        f"{str(err)[:120]}); it is damaged or of another format: run "
                        "moue-preprocess again") from None
    if bin_.stat().st_size < end:
        raise UserError(f"{bin_}: truncated ({bin_.stat().st_size:,} bytes, the index points to "
                        f"{end:,}); copy it again or run moue-preprocess again")
    return lengths


def max_token_id(prefix: str) -> int:
    """The largest token id stored in ``prefix``.bin (read in chunks)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    tokens = np.memmap(f"{prefix}.bin", dtype=dataset.index.dtype, mode="r")
    del dataset
    chunk = 1 << 26
    return max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1)


def read_meta(prefix: str) -> dict | None:
    """``PREFIX.meta.json`` (what moue-preprocess recorded), or None for a dataset made by
    another tool; a damaged one is a ``UserError`` naming it."""
    path = Path(f"{prefix}.meta.json")
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta.get("tokenizer"), dict):
            raise KeyError("tokenizer")
        return meta
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: damaged ({type(err).__name__}); remove it (the tokenizer is "
                        "then not checked) or run moue-preprocess again") from None


def check_dataset_tokenizer(prefix: str, tokenizer: Tokenizer, vocab_size: int | None = None,
                            field: str = "data.path") -> None:
    """Raise if ``prefix`` (given as config ``field``) is damaged, was preprocessed with another
    tokenizer than ``tokenizer``, or (for a dataset made by another tool, with no
    ``.meta.json``) holds ids ``>= vocab_size``."""
    read_lengths(prefix, field)
    meta = read_meta(prefix)
    if meta is None:  # made by another tool: check the ids themselves
        largest = max_token_id(prefix) if vocab_size else -1
        if vocab_size and largest >= vocab_size:
            raise UserError(f"{field}={prefix}: holds token id {largest}, beyond "
                            f"model.vocab_size={vocab_size}; raise model.vocab_size above "
                            f"{largest}, or preprocess the data with data.tokenizer")
        return
    recorded = meta["tokenizer"]
    mine = tokenizer.describe()
    if (recorded["kind"], recorded["vocab_size"], recorded["eod"]) != (
            mine["kind"], mine["vocab_size"], mine["eod"]):
        raise UserError(
            f"data: {prefix} was tokenized with {recorded['kind']} (vocab {recorded['vocab_size']}"
            f", eod {recorded['eod']}) but data.tokenizer is {mine['kind']} (vocab "
            f"{mine['vocab_size']}, eod {mine['eod']}); set data.tokenizer to the one used by "
            "moue-preprocess, or preprocess again")


def gpt_datasets(*, seq_length: int, seed: int, num_samples: tuple[int, int, int],
                 split: str = "98,2,0", tokenizer: Tokenizer | None = None,
                 blend: list | None = None, vocab_size: int | None = None,
                 cache_dir: str | None = None):
    """(train, valid, test) GPT datasets: mock when ``blend`` is None, else the weighted blend
    ``[weight, prefix, weight, prefix, ...]`` (or ``[prefix]``).

    ``cache_dir`` keeps Megatron's sample indices between runs; with it, Megatron builds them on
    global rank 0, so torch.distributed must be initialised (as it is in training).
    """
    if blend is None:
        cls, blend_arg = MockGPTDataset, None
        megatron_tok = MegatronTokenizer(vocab_size or tokenizer.vocab_size)
    else:
        if tokenizer is None:
            raise UserError("data.tokenizer is needed to read preprocessed data")
        prefixes, weights = _parse_blend(blend)
        field = "data.path" if len(blend) == 1 else "data.blend"
        for prefix in prefixes:
            check_dataset_tokenizer(prefix, tokenizer, vocab_size, field)
        megatron_tok, cls, blend_arg = MegatronTokenizer.of(tokenizer), GPTDataset, (prefixes, weights)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend_arg, split=split,
        tokenizer=megatron_tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache_dir)
    for prefix in (blend_arg[0] if blend_arg else ()):
        check_split_sizes(prefix, split, config.split_matrix, num_samples, seq_length)
    return BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config).build()


def check_split_sizes(prefix: str, split: str, split_matrix, num_samples, seq_length: int) -> None:
    """Raise if a split that must give samples holds less than one sequence of ``prefix``.

    Megatron loops forever counting epochs of an empty split (0 tokens per epoch never reach
    the tokens requested), so a small corpus with a 2% validation share would hang the run.
    The bounds are Megatron's: ``round(share * documents)``.
    """
    lengths = read_lengths(prefix)
    count = len(lengths)
    for name, bounds, wanted in zip(("train", "valid", "test"), split_matrix, num_samples,
                                    strict=True):
        if not wanted or bounds is None:
            continue
        begin, end = (int(round(b * count)) for b in bounds)
        tokens = int(lengths[begin:end].sum())
        if tokens <= seq_length:
            raise UserError(
                f"data.split={split!r}: the {name} split of {prefix} gets {end - begin} of its "
                f"{count} documents ({tokens} tokens), less than one sequence of {seq_length} + 1 "
                f"tokens; give the {name} split a larger share of data.split, or use a larger "
                "corpus")


def mock_gpt_datasets(*, vocab_size: int, seq_length: int, seed: int,
                      num_samples: tuple[int, int, int], split: str = "98,2,0"):
    """(train, valid, test) mock datasets holding at least ``num_samples`` sequences each."""
    return gpt_datasets(seq_length=seq_length, seed=seed, num_samples=num_samples, split=split,
                        vocab_size=vocab_size)


def _parse_blend(blend: list) -> tuple[list[str], list[float] | None]:
    if len(blend) == 1:
        return [str(blend[0])], None
    if len(blend) % 2:
        raise UserError(f"data.blend={blend!r}: give [weight, prefix, weight, prefix, ...] or "
                         "[prefix]")
    weights, prefixes = blend[0::2], blend[1::2]
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise UserError(f"data.blend={blend!r}: weights come first in each pair, e.g. "
                         "[0.7, data/a, 0.3, data/b]") from None
    return [str(p) for p in prefixes], weights
