"""The metric model: a small CNN digit classifier whose penultimate features define the benchmark's FD.

It plays the role Inception-v3 plays for FID (Heusel et al., 2017): class accuracy of generated samples
measures prompt fidelity, and the Fréchet distance between feature Gaussians measures sample quality.
Features come after a smooth activation (SiLU), so their covariance is full rank, which keeps the
matrix square root in the FD well conditioned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.bench.digits.data import NUM_DIGITS, DigitsData


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training of the digit classifier (all fields enter the cache key).

    Args:
        width: channels of the first conv (later convs use ``2 × width``).
        feature_dim: size of the penultimate feature vector used for FD.
        epochs: passes over the training split.
        batch_size: images per step.
        lr: AdamW learning rate (cosine decay to 0).
        max_shift: training augmentation, random translation by up to this many pixels.
    """

    width: int = 32
    feature_dim: int = 64
    epochs: int = 15
    batch_size: int = 128
    lr: float = 5e-3
    max_shift: int = 1

    def __post_init__(self) -> None:
        if min(self.width, self.feature_dim, self.epochs, self.batch_size) < 1:
            raise ValueError(f"width, feature_dim, epochs and batch_size must be >= 1, got {self}")
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")

    def to_dict(self) -> dict:
        return asdict(self)


class DigitClassifier(nn.Module):
    """CNN over ``(N, 1, S, S)`` images in ``[-1, 1]``; ``features`` gives ``(N, feature_dim)``."""

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),  # (N, 2*width*16)
            nn.Linear(2 * width * 16, feature_dim),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, NUM_DIGITS)
        self.test_accuracy: float | None = None  # held-out accuracy, set when loaded from the cache

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, feature_dim)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 10)``."""
        return self.head(self.dropout(self.features(x)))


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1)."""
    if max_shift == 0:
        return x
    n, _, s, _ = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)  # (N, 1, S+2m, S+2m)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(s))[:, :, None]  # (N, S, 1)
    cols = (dx[:, None] + torch.arange(s))[:, None, :]  # (N, 1, S)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)  # (N, 1, S, S)


@torch.inference_mode()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted class ids ``int64 (N,)``."""
    classifier.eval()
    return torch.cat([classifier(b).argmax(1) for b in images.split(batch_size)])


def train_classifier(
    train: DigitsData, config: ClassifierConfig | None = None, seed: int = 0, *, progress: bool = True
) -> DigitClassifier:
    """Train the classifier (a few seconds on CPU); deterministic for a seed. Returned in eval mode."""
    config = config or ClassifierConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(config.width, config.feature_dim)
        gen = torch.Generator().manual_seed(seed)
        steps_per_epoch = -(-len(train) // config.batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, config.lr, total_steps=config.epochs * steps_per_epoch
        )
        model.train()
        for _ in tqdm(range(config.epochs), desc="train classifier", disable=not progress):
            order = torch.randperm(len(train), generator=gen)
            for idx in order.split(config.batch_size):
                x = _random_shift(train.images[idx], config.max_shift, gen)
                loss = nn.functional.cross_entropy(model(x), train.labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()
