"""The device-side tensor digest of the weights key (what a CUDA load device runs), checked on the
CPU against plain integer arithmetic: exact row sums, whatever the chunking, and every word counts."""
import numpy as np
import pytest
import torch

from IDFusion.models import fingerprint as F

CPU = torch.device("cpu")


def reference_rows(t: torch.Tensor) -> np.ndarray:
    """The row sums in Python-exact integers (numpy int64 cannot overflow here: |sum| < 2**46)."""
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if len(data) % 2:
        data += b"\0"
    words = np.frombuffer(data, dtype=np.int16).astype(np.int64)
    m = F.multipliers(CPU).numpy().astype(np.int64)
    rows = [words[i:i + F.ROW_WORDS] @ m[:len(words[i:i + F.ROW_WORDS])] for i in range(0, len(words), F.ROW_WORDS)]
    return np.stack(rows) if rows else np.zeros((0, F.COLUMNS), np.int64)


@pytest.mark.parametrize("shape, dtype", [((3 * F.ROW_WORDS + 17,), torch.float16), ((640, 320), torch.float32),
                                          ((5,), torch.bfloat16), ((7,), torch.uint8), ((0,), torch.float32)])
def test_row_sums_are_the_exact_integer_sums(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=gen) * 50).to(dtype)
    assert np.array_equal(F.row_sums(t, CPU).numpy(), reference_rows(t))


def test_row_sums_do_not_depend_on_how_the_work_is_chunked(monkeypatch):
    t = torch.randn(9 * F.ROW_WORDS + 3, generator=torch.Generator().manual_seed(1))
    whole = F.row_sums(t, CPU)
    monkeypatch.setattr(F, "CHUNK_WORDS", F.ROW_WORDS * 2)
    assert torch.equal(F.row_sums(t, CPU), whole)


@pytest.mark.parametrize("index", [0, 1, F.ROW_WORDS // 2 - 1, F.ROW_WORDS // 2, -2, -1])
def test_a_change_of_any_one_word_changes_the_row_sums(index):
    t = torch.randn(F.ROW_WORDS + 11, generator=torch.Generator().manual_seed(2))        # a full row and a tail
    changed = t.clone()
    words = changed.view(torch.int16)
    words[index] = words[index] ^ 1                                                        # one bit of one word
    assert not torch.equal(F.row_sums(changed, CPU), F.row_sums(t, CPU))


def test_the_multipliers_are_fixed_non_zero_integers():
    m = F.multipliers(CPU)
    assert m.shape == (F.ROW_WORDS, F.COLUMNS) and m.dtype == torch.float64
    assert bool((m >= 1).all()) and bool((m <= 65535).all()) and torch.equal(m, m.round())
    assert len(torch.unique(m)) > 50000                       # 131072 draws of 65535 values: about 56700
    F._multipliers.clear()                                     # computed again from the seed: the same
    assert torch.equal(F.multipliers(CPU), m)
