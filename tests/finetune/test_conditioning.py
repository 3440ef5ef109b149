"""Conditioning dicts: indexing, broadcasting, concatenation, CFG dropout of exactly the masked samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.finetune import fit_denoiser
from diffquant.finetune.conditioning import (
    class_conditioning,
    concat_conditioning,
    conditioning_batch_size,
    conditioning_to,
    expand_conditioning,
    index_conditioning,
    select_conditioning,
)
from diffquant.models.tiny import scheduler_for_tests


def _sdxl_like(batch: int, fill: float | None = None) -> dict:
    gen = torch.Generator().manual_seed(batch)

    def draw(*shape):
        return torch.full(shape, fill) if fill is not None else torch.randn(*shape, generator=gen)

    return {
        "encoder_hidden_states": draw(batch, 3, 4),
        "added_cond_kwargs": {"text_embeds": draw(batch, 2), "time_ids": draw(batch, 6), "resolution": None},
        "return_dict": False,
    }


def test_index_concat_expand_and_move():
    cond = _sdxl_like(5)
    assert conditioning_batch_size(cond) == 5
    picked = index_conditioning(cond, torch.tensor([4, 0, 0]))
    assert torch.equal(picked["encoder_hidden_states"][0], cond["encoder_hidden_states"][4])
    assert torch.equal(picked["added_cond_kwargs"]["time_ids"][1], cond["added_cond_kwargs"]["time_ids"][0])
    assert picked["added_cond_kwargs"]["resolution"] is None and picked["return_dict"] is False
    uncond = expand_conditioning(_sdxl_like(1, fill=0.0), 3)
    assert conditioning_batch_size(uncond) == 3
    both = concat_conditioning(picked, uncond)
    assert both["added_cond_kwargs"]["text_embeds"].shape == (6, 2)
    assert torch.equal(both["encoder_hidden_states"][3:], torch.zeros(3, 3, 4))
    half = conditioning_to({"class_labels": torch.arange(2), "x": torch.ones(2)}, "cpu", torch.float16)
    assert half["class_labels"].dtype == torch.long and half["x"].dtype == torch.float16


def test_select_replaces_exactly_the_masked_samples():
    cond, uncond = _sdxl_like(4), _sdxl_like(1, fill=-7.0)
    mask = torch.tensor([False, True, True, False])
    mixed = select_conditioning(mask, cond, uncond)
    for key, value in (("encoder_hidden_states", mixed["encoder_hidden_states"]),
                       ("text_embeds", mixed["added_cond_kwargs"]["text_embeds"])):  # fmt: skip
        original = cond[key] if key in cond else cond["added_cond_kwargs"][key]
        assert torch.equal(value[~mask], original[~mask]), key
        assert bool((value[mask] == -7.0).all()), key
    labels = select_conditioning(mask, class_conditioning(torch.tensor([1, 2, 3, 4])), class_conditioning(10))
    assert labels["class_labels"].tolist() == [1, 10, 10, 4]


def test_mismatches_are_clear_errors():
    with pytest.raises(ValueError, match="different keys"):
        select_conditioning(torch.tensor([True]), {"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="agree beyond the batch"):
        select_conditioning(torch.tensor([True, False]), {"a": torch.zeros(2, 5)}, {"a": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        conditioning_batch_size({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="cannot broadcast"):
        expand_conditioning({"a": torch.zeros(2)}, 3)


class Recorder(nn.Module):
    """A denoiser that records the conditioning of every call."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, tag):
        self.seen.append(tag.clone())
        return x * self.weight


def test_fit_denoiser_drops_exactly_the_samples_its_generator_masks():
    """Per step: batch indices, then the dropout mask, then timesteps and noise (the digits order)."""
    images, tags = torch.zeros(6, 1, 2, 2), torch.arange(6.0)
    model, p, batch, seed = Recorder(), 0.4, 5, 3
    fit_denoiser(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        images,
        {"tag": tags},
        scheduler_for_tests(),
        steps=4,
        batch_size=batch,
        unconditional={"tag": torch.tensor([-1.0])},
        cond_dropout=p,
        seed=seed,
        progress=False,
    )
    gen = torch.Generator().manual_seed(seed)
    dropped = 0
    for seen in model.seen:
        idx = torch.randint(0, 6, (batch,), generator=gen)
        mask = torch.rand(batch, generator=gen) < p
        torch.randint(0, 1000, (batch,), generator=gen), torch.randn(batch, 1, 2, 2, generator=gen)
        assert torch.equal(seen, torch.where(mask, -1.0, tags[idx]))
        dropped += int(mask.sum())
    assert 0 < dropped < 4 * batch
