"""TuneQDM: fine-tune a quantized diffusion model by training only its quantization scales.

Ryu, Lim, Shim, "Memory-Efficient Fine-Tuning for Quantized Diffusion Model", ECCV 2024. Weights are
quantized per output channel to INT 2/4/8 and frozen (stored packed); each layer trains an output
scale ``delta_out`` and optionally an input scale ``delta_in``, with ``num_experts`` timestep-aware
copies (TAS) selected per sample by ``floor(t · num_experts / total_denoising_steps)``.

Training::

    config = TuneQDMConfig(n_bits=8, num_experts=4, train_delta_in=True)
    apply_tuneqdm(unet, config)                    # everything else is frozen
    register_tas_pre_hook(unet, config.num_experts)  # experts follow each call's timestep argument
    opt = torch.optim.AdamW(trainable_delta_parameters(unet), lr=3e-6)  # the seed's absolute rate
    # or: AdamW(delta_param_groups(unet, lr=1e-2)): rates relative to each scale, same at any bit width
    ...                                            # the usual denoising loss, backward, step
    save_delta_state(unet, "dog.safetensors", config=config)

Inference::

    config = load_delta_config("dog.safetensors")
    quantize_model(pipe.unet, config)
    load_delta_state(pipe.unet, "dog.safetensors")
    register_tas_pre_hook(pipe.unet, config.num_experts, num_inference_steps=50)
"""

from diffquant.tuneqdm.apply import (
    apply_tuneqdm,
    delta_param_groups,
    quantize_model,
    trainable_delta_parameters,
    tuneqdm_config,
    tuneqdm_layers,
)
from diffquant.tuneqdm.checkpoint import (
    DELTA_FILE_NAME,
    load_delta_config,
    load_delta_state,
    save_delta_state,
)
from diffquant.tuneqdm.config import TuneQDMConfig
from diffquant.tuneqdm.experts import expert_index
from diffquant.tuneqdm.layers import TQConv2d, TQLinear, is_tuneqdm_layer
from diffquant.tuneqdm.tas import register_tas_pre_hook, set_timestep

__all__ = [
    "DELTA_FILE_NAME",
    "TQConv2d",
    "TQLinear",
    "TuneQDMConfig",
    "apply_tuneqdm",
    "delta_param_groups",
    "expert_index",
    "is_tuneqdm_layer",
    "load_delta_config",
    "load_delta_state",
    "quantize_model",
    "register_tas_pre_hook",
    "save_delta_state",
    "set_timestep",
    "trainable_delta_parameters",
    "tuneqdm_config",
    "tuneqdm_layers",
]
