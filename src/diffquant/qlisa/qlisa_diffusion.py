"""QLISADiffusion: NF4 frozen layers + layerwise importance sampling + optimizer in backward (seed 000).

QLISA combines QLoRA's storage (Dettmers et al., NeurIPS 2023: NF4, blocks of 64, double quantization)
with LISA's training (Pan et al., NeurIPS 2024: every ``interval`` steps train the first and last layer
and ``gamma`` others sampled uniformly), and steps each parameter inside backward so that neither the
full gradient nor optimizer state for frozen layers ever exists. Every ``nn.Linear`` / ``nn.Conv2d`` of
the model is a sampling layer, in module order.

Three defects of the reference implementation are avoided (each is tested): hooks are installed on
every layer when it is sampled, not only on the layers active at the start; a re-frozen layer's hook,
optimizer and scheduler are deleted with their state; there is no optimizer built once from the initial
``requires_grad`` set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from diffquant.api import attach_default_noise_context
from diffquant.config import QuantConfig
from diffquant.layer_swap import replace_layers
from diffquant.qlisa.layers import NF4_CONFIG, QLISALayer, qlisa_layer_for
from diffquant.qlisa.optim import OptimizerFactory, OptimizerInBackward, SchedulerFactory, adamw_factory
from diffquant.qlisa.sampling import DEFAULT_GAMMA, DEFAULT_INTERVAL, LayerSampler
from diffquant.targeting import LayerSelection, select_targets


class QLISADiffusion:
    """Fine-tune a diffusion model with QLISA, in place.

    Lifecycle: ``register()`` (convert layers to NF4, draw the first active set) → ``insert_hook()``
    (optimizer-in-backward hooks) → per training step: forward, ``loss.backward()`` (the hooks step the
    active parameters), ``step()`` → ``finalize()`` (inference model for :func:`diffquant.save_quantized`).

    Args:
        model: the denoiser; its Linear/Conv2d layers are replaced by QLISA layers, every other
            parameter (norms, embeddings) is frozen and kept as it is.
        gamma: middle layers trained per period besides the first and last (default: LMFlow's 2, or
            every middle layer of a model with fewer).
        interval: steps between re-samplings, K (LMFlow default 20).
        lr: learning rate of the default optimizer (AdamW, no weight decay); ignored when ``optimizer``
            is given.
        optimizer: factory ``fn([param]) -> Optimizer`` building each parameter's optimizer.
        lr_scheduler: factory ``fn(optimizer) -> LRScheduler`` (default constant); schedulers count
            global steps, see :class:`~diffquant.qlisa.optim.OptimizerInBackward`.
        seed: seeds the layer sampler.
        max_grad_norm: per-parameter gradient clipping norm (``None``: no clipping).
        include: regexes (``re.fullmatch`` on module names) of the Linear/Conv2d layers to convert; empty
            means all. exclude: regexes of layers left in full precision and frozen.
        keep_fp: regexes of more layers left in full precision and frozen; ``None`` uses the
            architecture's defaults (see :mod:`diffquant.models`). The default ``()`` keeps none:
            LISA always trains the model's first and last layers, which the architecture defaults
            (``conv_in`` / ``conv_out`` of a UNet) would freeze in float. The selection is
            :func:`diffquant.targeting.select_targets`'s, as for every method.
        compute_dtype: dtype the frozen layers dequantize to and compute in (bfloat16, as QLoRA).

    Raises:
        ValueError: no Linear/Conv2d layer selected ("nothing to train"), a model that is already
            quantized, a bare Linear/Conv2d instead of a model, a Conv2d with a padding mode other than
            ``"zeros"``, ``interval < 1``, or ``gamma`` above the number of middle layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> qlisa = QLISADiffusion(model, gamma=1, interval=5, lr=1e-3).register().insert_hook()
        >>> for _ in range(10):
        ...     model(torch.randn(4, 8)).pow(2).mean().backward()
        ...     qlisa.step()
        >>> model = qlisa.finalize()  # QuantLinear layers with NF4 weights
    """

    def __init__(
        self,
        model: nn.Module,
        gamma: int | None = None,
        interval: int = DEFAULT_INTERVAL,
        lr: float = 1e-4,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        seed: int = 0,
        max_grad_norm: float | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        compute_dtype: torch.dtype = torch.bfloat16,
        keep_fp: Sequence[str] | None = (),
    ):
        if getattr(model, "diffquant_config", None) is not None:
            raise ValueError(
                "model is already quantized; QLISA fine-tunes a float model. Pass the float model."
            )
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"interval must be a positive number of steps, got {interval!r} (LMFlow uses 20)."
            )
        if isinstance(model, nn.Linear | nn.Conv2d):
            raise ValueError(
                f"QLISA replaces layers inside a model, got a bare {type(model).__name__}; wrap it, e.g. "
                "nn.Sequential(layer), and pass the container."
            )
        self.model = model
        self.interval = interval
        self.selection = LayerSelection(include, exclude, keep_fp)
        self.compute_dtype = compute_dtype
        try:
            self.layer_names: tuple[str, ...] = select_targets(model, self.selection).quantize
        except ValueError as err:
            raise ValueError(f"nothing to train: {err} QLISA trains those layers.") from err
        for name in self.layer_names:  # checked here so that register() never stops half-way
            module = model.get_submodule(name)
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise ValueError(
                    f"layer {name!r} is a Conv2d with padding_mode={module.padding_mode!r}; QLISA supports "
                    f"'zeros' only. Keep it frozen in full precision with exclude=[{name!r}]."
                )
        if gamma is None:
            gamma = min(DEFAULT_GAMMA, max(len(self.layer_names) - 2, 0))
        self.sampler = LayerSampler(len(self.layer_names), gamma, seed)
        self.optimizers = OptimizerInBackward(optimizer or adamw_factory(lr), lr_scheduler, max_grad_norm)
        self.global_step = 0
        self._layers: dict[str, QLISALayer] = {}
        self._active: tuple[int, ...] = ()
        self._hooked = False
        self._finalized = False

    # ---- lifecycle -------------------------------------------------------------------------------

    def register(self) -> QLISADiffusion:
        """Freeze every parameter of the model, replace the selected layers by NF4 QLISA layers, and
        activate the first sampled set (first, last and ``gamma`` others). Idempotent; returns ``self``.

        Every selected layer is quantized, those that train first included: training starts from the
        NF4 weights, as QLoRA's does from its 4-bit base model.

        Raises:
            RuntimeError: after :meth:`finalize`.
        """
        self._check_not_finalized("register")
        if self._layers:
            return self
        self.model.requires_grad_(False)
        self._layers = replace_layers(
            self.model,
            self.layer_names,
            lambda _, layer: qlisa_layer_for(layer, NF4_CONFIG, self.compute_dtype),
        )
        self._activate(self.sampler.sample())
        return self

    def insert_hook(self) -> QLISADiffusion:
        """Install the optimizer-in-backward hooks: each active parameter gets its own optimizer, LR
        scheduler and post-accumulate-grad hook now, and every layer activated later gets them at
        activation. Idempotent (a parameter never gets two hooks); returns ``self``.

        Raises:
            RuntimeError: before :meth:`register` or after :meth:`finalize`.
        """
        self._check_not_finalized("insert_hook")
        if not self._layers:
            raise RuntimeError(
                "call QLISADiffusion.register() before insert_hook(): there are no layers yet."
            )
        self._hooked = True
        for index in self._active:
            self._attach(self._layers[self.layer_names[index]])
        return self

    def step(self) -> None:
        """Count one training step (call it once per step, after ``loss.backward()``); every
        ``interval`` steps, re-sample the active layers: layers leaving the set are re-quantized to NF4
        and lose their optimizer state, layers entering it are dequantized and get fresh optimizers.
        Layers in both sets (always the first and last) keep training undisturbed.

        Raises:
            RuntimeError: before :meth:`insert_hook` (nothing would be updated) or after :meth:`finalize`.
        """
        self._check_not_finalized("step")
        if not self._hooked:
            raise RuntimeError(
                "call QLISADiffusion.register() and insert_hook() before training: without the hooks, "
                "backward computes gradients that no optimizer applies."
            )
        self.global_step += 1
        if self.global_step % self.interval == 0:
            self._resample()

    def finalize(self) -> nn.Module:
        """Freeze every layer (NF4), remove all hooks and optimizers, and replace the QLISA layers by
        :class:`~diffquant.nn.qmodules.QuantLinear` / :class:`~diffquant.nn.qmodules.QuantConv2d` with
        the same NF4 weights, so :func:`diffquant.save_quantized` / :func:`diffquant.load_quantized`
        work. Returns the model (in place); this object is unusable afterwards.

        Raises:
            RuntimeError: before :meth:`register`, or when called twice.
        """
        self._check_not_finalized("finalize")
        if not self._layers:
            raise RuntimeError("call QLISADiffusion.register() (and train) before finalize().")
        self._deactivate(self._active)
        for name, layer in self._layers.items():
            self.model.set_submodule(name, layer.to_quant_layer())
        self._layers.clear()
        self._finalized = True
        self.model.diffquant_config = QuantConfig(
            weights=NF4_CONFIG,
            include=self.selection.include,
            exclude=self.selection.exclude,
            keep_fp=self.selection.keep_fp,
        )
        attach_default_noise_context(self.model)
        return self.model

    # ---- state -----------------------------------------------------------------------------------

    @property
    def layers(self) -> dict[str, QLISALayer]:
        """The QLISA layers by module name, in module order (empty before :meth:`register`)."""
        return dict(self._layers)

    @property
    def active_layers(self) -> tuple[str, ...]:
        """Names of the currently trained layers, in module order."""
        return tuple(self.layer_names[i] for i in self._active)

    def named_optimizers(self) -> dict[str, Optimizer]:
        """The optimizer of every parameter that has one, by parameter name (``<layer>.trainable_weight``,
        ``<layer>.bias``)."""
        return {
            f"{name}.{pname}": self.optimizers.optimizer_of(p)
            for name, layer in self._layers.items()
            for pname, p in layer.named_parameters(recurse=False)
            if p in self.optimizers
        }

    # ---- internals -------------------------------------------------------------------------------

    def _check_not_finalized(self, what: str) -> None:
        if self._finalized:
            raise RuntimeError(f"QLISADiffusion.{what}() after finalize(): wrap a fresh float model instead.")

    def _attach(self, layer: QLISALayer) -> None:
        for param in layer.parameters(recurse=False):
            self.optimizers.attach(param, self.global_step)

    def _activate(self, indices: Sequence[int]) -> None:
        for index in indices:
            layer = self._layers[self.layer_names[index]]
            layer.activate()
            if self._hooked:
                self._attach(layer)
        self._active = tuple(sorted({*self._active, *indices}))

    def _deactivate(self, indices: Sequence[int]) -> None:
        for index in indices:
            layer = self._layers[self.layer_names[index]]
            for param in layer.parameters(recurse=False):
                self.optimizers.detach(param)
            layer.freeze()
        leaving = set(indices)
        self._active = tuple(i for i in self._active if i not in leaving)

    def _resample(self) -> None:
        chosen = self.sampler.sample()
        self._deactivate([i for i in self._active if i not in chosen])  # free memory before allocating
        self._activate([i for i in chosen if i not in self._active])
