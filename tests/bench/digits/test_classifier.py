import torch

from diffquant.bench.digits.classifier import (
    ClassifierConfig,
    DigitClassifier,
    _random_shift,
    train_classifier,
)
from diffquant.bench.digits.data import load_digits_dataset, train_test_split
from diffquant.eval.metrics import class_accuracy


def test_classifier_reaches_97_percent_held_out():
    train, test = train_test_split(load_digits_dataset())
    model = train_classifier(train, seed=0, progress=False)
    assert class_accuracy(model, test.images, test.labels) >= 0.97
    feats = model.features(test.images[:5])
    assert feats.shape == (5, ClassifierConfig().feature_dim)
    assert model(test.images[:5]).shape == (5, 10)


def test_random_shift_moves_content_and_pads_with_background():
    x = torch.full((50, 1, 8, 8), -1.0)
    x[:, :, 3:5, 3:5] = 1.0
    shifted = _random_shift(x, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.all((shifted == 1.0).sum((1, 2, 3)) == 4)  # the blob is translated, not cut
    assert not torch.equal(shifted, x)
    assert torch.equal(_random_shift(x, 0, torch.Generator()), x)


def test_classifier_features_are_penultimate():
    model = DigitClassifier(width=4, feature_dim=6).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), model.head(model.features(x)))
