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


def test_a_split_too_small_for_one_sequence_is_refused_not_looped_on(tmp_path):
    """Megatron counts epochs of an empty split forever; moue names the split and the fix."""
    import json

    from data_tools.megatron_data import gpt_datasets
    from data_tools.preprocess import preprocess
    from data_tools.tokenizer import load_tokenizer

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(10)))
    preprocess([str(docs)], str(tmp_path / "ten"), "byte", append_eod=True, progress=False)
    build = lambda split: gpt_datasets(  # noqa: E731
        seq_length=32, seed=1, num_samples=(8, 4, 0), split=split,
        tokenizer=load_tokenizer("byte"), blend=[str(tmp_path / "ten")])
    with pytest.raises(ValueError, match=r"data.split='98,2,0': the valid split of .* gets 0 of "
                                         r"its 10 documents \(0 tokens\)"):
        build("98,2,0")
    train, valid, _ = build("80,20,0")  # 2 documents of ~230 bytes: enough for a sequence
    assert len(train) >= 8 and len(valid) >= 4
