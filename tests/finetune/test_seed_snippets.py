"""The seeds' own API usage runs as written (only the import paths differ)."""

from __future__ import annotations

import torch
import torch.nn as nn

from diffquant.finetune import denoising_loss
from diffquant.models.tiny import example_inputs, scheduler_for_tests, tiny_unet2d
from diffquant.qlisa import QLISADiffusion
from diffquant.tuneqdm import (
    TuneQDMConfig,
    apply_tuneqdm,
    load_delta_config,
    load_delta_state,
    quantize_model,
    register_tas_pre_hook,
    save_delta_state,
    set_timestep,
)


def test_seed_000_minimal_example():
    # Define a simple linear model for demonstration.
    class SimpleModel(nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.linear = nn.Linear(in_features, out_features)

        def forward(self, x):
            return self.linear(x)

    model = SimpleModel(10, 2)
    qlisa_obj = QLISADiffusion(model)
    # Now integrate qlisa_obj.register() and qlisa_obj.insert_hook() into your training loop.
    qlisa_obj.register().insert_hook()
    before = model.linear.trainable_weight.detach().clone()
    for _ in range(2):
        model(torch.randn(4, 10)).square().mean().backward()
        qlisa_obj.step()
    assert not torch.equal(before, model.linear.trainable_weight)
    assert torch.isfinite(qlisa_obj.finalize()(torch.randn(3, 10))).all()


def test_seed_002_programmatic_training_and_inference(tmp_path):
    unet = tiny_unet2d()
    scheduler = scheduler_for_tests()
    dataloader = [example_inputs(unet, batch_size=4, seed=i) for i in range(3)]

    def compute_loss(unet, batch):
        cond = {"class_labels": batch["class_labels"]}
        return denoising_loss(unet, batch["sample"], scheduler, cond, timesteps=batch["timestep"])

    # Configure
    config = TuneQDMConfig(
        n_bits=8,
        num_experts=4,
        train_delta_in=True
    )  # fmt: skip

    # Apply quantization to UNet
    apply_tuneqdm(unet, config)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)

    # Training loop
    for batch in dataloader:
        timestep = batch["timestep"]
        set_timestep(unet, timestep)  # Set expert based on timestep
        loss = compute_loss(unet, batch)
        loss.backward()
        optimizer.step()

    # Save
    save_delta_state(unet, tmp_path / "tuneqdm_state.pt", config=config)

    # Programmatic inference
    pipe_unet = tiny_unet2d()
    # Load config from checkpoint
    checkpoint = torch.load(tmp_path / "tuneqdm_state.pt")  # weights_only=True: tensors and plain data
    config = TuneQDMConfig(**checkpoint["config"])
    assert config == load_delta_config(tmp_path / "tuneqdm_state.pt")

    # Apply quantization and load weights
    quantize_model(pipe_unet, config)
    load_delta_state(pipe_unet, tmp_path / "tuneqdm_state.pt")
    register_tas_pre_hook(pipe_unet, config.num_experts, num_inference_steps=50)
    inputs = example_inputs(pipe_unet, batch_size=2, timesteps=[980, 20])
    set_timestep(unet, inputs["timestep"])
    with torch.no_grad():
        assert torch.equal(pipe_unet(**inputs).sample, unet(**inputs).sample)
    seed_format = {"n_bits": 8, "num_experts": 4, "train_delta_in": True}  # the seed's "config" dict
    assert TuneQDMConfig(**seed_format) == config
