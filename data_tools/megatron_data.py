"""Datasets for training, built by Megatron-Core's ``BlendedMegatronDatasetBuilder``.

``mock=True`` gives Megatron's ``MockGPTDataset``: synthetic token sequences, no files, for tests,
dry runs and smoke runs. (Indexed datasets and blends from files come with the preprocessing
tools.)
"""

from __future__ import annotations

from collections import OrderedDict

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers import MegatronTokenizerBase


class VocabularyOnly(MegatronTokenizerBase):
    """What mock data needs of a tokenizer: a vocabulary size and an end-of-document id."""

    def __init__(self, vocab_size: int, eod: int = 0):
        super().__init__(path="", config={})
        self._vocab_size, self._eod = vocab_size, eod

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
        return OrderedDict(cls=type(self).__qualname__, vocab_size=self._vocab_size, eod=self._eod)

    def tokenize(self, text):
        raise NotImplementedError("mock data has no text: use a real tokenizer to encode text")

    def detokenize(self, ids):
        raise NotImplementedError("mock data has no text: use a real tokenizer to decode ids")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("no chat template for mock data")


def mock_gpt_datasets(*, vocab_size: int, seq_length: int, seed: int,
                      num_samples: tuple[int, int, int], split: str = "98,2,0"):
    """(train, valid, test) mock datasets holding at least ``num_samples`` sequences each."""
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, split=split,
        tokenizer=VocabularyOnly(vocab_size), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(
        MockGPTDataset, list(num_samples), lambda: True, config).build()
