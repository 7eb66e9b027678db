"""data.mock=true: Megatron-Core's mock GPT dataset through its BlendedMegatronDatasetBuilder."""

import pytest
import torch

from data_tools.megatron_data import MegatronTokenizer, mock_gpt_datasets

pytestmark = pytest.mark.compat


def test_mock_datasets_hold_the_requested_samples_with_next_token_labels():
    train, valid, test = mock_gpt_datasets(vocab_size=256, seq_length=16, seed=3,
                                           num_samples=(16, 4, 0))
    # Megatron's mock dataset holds at least the requested samples (it builds an epoch of them).
    assert len(train) >= 16 and len(valid) >= 4
    for i in range(16):
        sample = train[i]
        assert sample["tokens"].shape == sample["labels"].shape == (16,)
        assert int(sample["tokens"].max()) < 256 and int(sample["tokens"].min()) >= 0
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels: next tokens


def test_mock_datasets_are_deterministic_in_the_seed():
    a, _, _ = mock_gpt_datasets(vocab_size=100, seq_length=8, seed=1, num_samples=(8, 2, 0))
    b, _, _ = mock_gpt_datasets(vocab_size=100, seq_length=8, seed=1, num_samples=(8, 2, 0))
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(8))


def test_vocabulary_only_tokenizer_refuses_text():
    tok = MegatronTokenizer(256)
    assert (tok.vocab_size, tok.eod) == (256, 0)
    with pytest.raises(NotImplementedError, match="mock data has no text"):
        tok.tokenize("hello")
