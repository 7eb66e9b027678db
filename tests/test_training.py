"""moue-pretrain's training loop: the same loss curve under every layout, read from metrics.jsonl."""

import pytest

from tests.distributed import launch

CASES = "tests.cases.training"


def _rows(name, nproc):
    per_rank = [rows for rows in launch(CASES, nproc)[f"train[{name}]"] if rows is not None]
    assert per_rank and all(rows == per_rank[0] for rows in per_rank)  # one shared file
    return per_rank[0]


@pytest.fixture(scope="module")
def reference():
    return _rows("single", 1)


def test_metrics_file_has_the_promised_fields(reference):
    assert [r["step"] for r in reference] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "balance_loss", "tokens_per_s", "load_max_over_mean"):
        assert all(key in r for r in reference), key
    assert "val_loss" in reference[-1] and reference[-1]["val_ppl"] > 1
    assert reference[0]["balance_loss"] == pytest.approx(1.0, abs=1e-6)  # UELB with F = Q
    assert reference[0]["lr"] == pytest.approx(3e-3)  # step 1 of 1 warmup step: the peak lr


@pytest.mark.parametrize("layout", ["tp2", "ep2", "pp2"])
def test_same_loss_curve_as_one_process(layout, reference):
    rows = _rows(layout, 2)
    for key in ("loss", "grad_norm", "balance_loss", "val_loss"):
        ref = [r[key] for r in reference if key in r]
        got = [r[key] for r in rows if key in r]
        assert len(got) == len(ref) > 0
        assert max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) < 1e-5, (key, got, ref)
