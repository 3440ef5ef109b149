import pytest
import torch

from diffquant.bench.digits.data import NUM_DIGITS, DigitsData, load_digits_dataset, train_test_split


def test_digits_shapes_and_range():
    data = load_digits_dataset()
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.dtype == torch.float32
    assert data.labels.dtype == torch.int64
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert set(data.labels.tolist()) == set(range(NUM_DIGITS))
    # 17 grey levels 0..16 map to multiples of 1/8 in [-1, 1]
    assert torch.equal(data.images * 8, (data.images * 8).round())


def test_upsampled_digits_stay_in_range():
    data = load_digits_dataset(16)
    assert data.images.shape == (1797, 1, 16, 16)
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0


def test_split_is_deterministic_stratified_and_disjoint():
    data = load_digits_dataset()
    train_a, test_a = train_test_split(data)
    train_b, test_b = train_test_split(data)
    assert torch.equal(train_a.images, train_b.images) and torch.equal(test_a.labels, test_b.labels)
    assert len(train_a) + len(test_a) == len(data)
    assert abs(len(test_a) / len(data) - 0.2) < 0.01
    # stratified: every class keeps its share within one example
    for cls in range(NUM_DIGITS):
        expected = (data.labels == cls).sum().item() * 0.2
        assert abs((test_a.labels == cls).sum().item() - expected) <= 1
    other_train, _ = train_test_split(data, seed=1)
    assert not torch.equal(other_train.labels, train_a.labels)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="below the native"):
        load_digits_dataset(4)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(load_digits_dataset(), test_fraction=1.5)
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\)"):
        DigitsData(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        DigitsData(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))
