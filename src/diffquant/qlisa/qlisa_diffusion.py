"""QLISADiffusion: NF4 frozen layers + layerwise importance sampling + optimizer in backward (seed 000).

QLISA combines QLoRA's storage (Dettmers et al., NeurIPS 2023: NF4, blocks of 64, double quantization)
with LISA's training (Pan et al., NeurIPS 2024: every ``interval`` steps train the first and last layer
and ``gamma`` others sampled uniformly), and steps each parameter inside backward so that neither the
full gradient nor optimizer state for frozen layers ever exists. Every ``nn.Linear`` / ``nn.Conv2d`` of
the model is a sampling layer, in module order.

Three defects of the reference implementation are avoided (each is tested): hooks are installed on
every layer when it is sampled, not only on the layers active at the start; a re-frozen layer's hook,
optimizer and scheduler are deleted with their state; there is no optimizer built once from the initial
``requires_grad`` set. And, as LISA intends, the layers are re-sampled every ``interval`` optimizer steps
even when the training loop never calls :meth:`QLISADiffusion.step`: the hooks count the steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

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
    active parameters and count the step) → ``finalize()`` (inference model for
    :func:`diffquant.save_quantized`). Every ``interval`` counted steps the active layers are re-sampled,
    before the next forward (or at :meth:`step`, which a loop may call after each backward, or at
    :meth:`finalize`): a loop that calls ``step()`` and one that does not train the same layers, bit for
    bit. ``state_dict()`` / ``load_state_dict()`` save and restore all of it (resumable training).

    Args:
        model: the denoiser; its Linear/Conv2d layers are replaced by QLISA layers, every other
            parameter (norms, embeddings) is frozen and kept as it is.
        gamma: middle layers trained per period besides the first and last (default: LMFlow's 2);
            clamped, with a warning, to the number of middle layers of a model that has fewer.
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
            ``"zeros"``, ``interval < 1``, or a negative ``gamma``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> qlisa = QLISADiffusion(model, gamma=1, interval=5, lr=1e-3).register().insert_hook()
        >>> for _ in range(10):
        ...     model(torch.randn(4, 8)).pow(2).mean().backward()  # steps, counts; re-samples every 5
        >>> qlisa.global_step
        10
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
        num_middle = max(len(self.layer_names) - 2, 0)
        if gamma is None:
            gamma = min(DEFAULT_GAMMA, num_middle)
        elif isinstance(gamma, int) and not isinstance(gamma, bool) and gamma > num_middle:
            warnings.warn(
                f"gamma={gamma} is more than the {num_middle} layers between the always-trained first and "
                f"last of the {len(self.layer_names)} selected; training all of them (gamma={num_middle}).",
                stacklevel=2,
            )
            gamma = num_middle
        self.sampler = LayerSampler(len(self.layer_names), gamma, seed)
        self.optimizers = OptimizerInBackward(
            optimizer or adamw_factory(lr), lr_scheduler, max_grad_norm, after_backward=self._count_step
        )
        self.global_step = 0
        self._layers: dict[str, QLISALayer] = {}
        self._active: tuple[int, ...] = ()
        self._hooked = False
        self._finalized = False
        self._uncounted_by_step = 0  # steps the hooks counted since the last step() call
        self._resample_due = False
        self._forward_hook = None

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
        if not self._hooked:
            self._forward_hook = self.model.register_forward_pre_hook(self._before_forward)
        self._hooked = True
        for index in self._active:
            self._attach(self._layers[self.layer_names[index]])
        return self

    def step(self) -> None:
        """Optional: apply now what the hooks counted (call it after ``loss.backward()``). Every
        ``interval`` optimizer steps the active layers are re-sampled: layers leaving the set are
        re-quantized to NF4 and lose their optimizer state, layers entering it are dequantized and get
        fresh optimizers; layers in both sets (always the first and last) keep training undisturbed.

        The hooks count each backward that stepped a parameter, and a due re-sampling happens before the
        next forward anyway; ``step()`` only makes it happen now. Called when no backward was counted
        since the last call, it counts one step itself.

        Raises:
            RuntimeError: before :meth:`insert_hook` (nothing would be updated) or after :meth:`finalize`.
        """
        self._check_not_finalized("step")
        if not self._hooked:
            raise RuntimeError(
                "call QLISADiffusion.register() and insert_hook() before training: without the hooks, "
                "backward computes gradients that no optimizer applies."
            )
        if not self._uncounted_by_step:
            self._count_step()
        self._uncounted_by_step = 0
        self._apply_due_resample()

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
        self._apply_due_resample()
        if self._forward_hook is not None:
            self._forward_hook.remove()
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

    def state_dict(self) -> dict[str, Any]:
        """Everything training changes: step counters, the sampler's generator, the active set, every
        layer's tensors (NF4 codes of frozen layers, float weights of active ones, biases) and each
        active parameter's optimizer and scheduler state (tensors and plain data, for
        :mod:`diffquant.finetune.resume`).

        Raises:
            RuntimeError: before :meth:`register` or after :meth:`finalize`.
        """
        self._check_not_finalized("state_dict")
        if not self._layers:
            raise RuntimeError("call QLISADiffusion.register() before state_dict().")
        return {
            "settings": self._settings(),
            "global_step": self.global_step,
            "uncounted_by_step": self._uncounted_by_step,
            "resample_due": self._resample_due,
            "sampler": self.sampler.generator.get_state(),
            "active": list(self.active_layers),
            "layers": {name: dict(layer.state_dict()) for name, layer in self._layers.items()},
            "optimizers": {
                name: {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": self.optimizers.scheduler_of(self._parameter(name)).state_dict(),
                }
                for name, optimizer in self.named_optimizers().items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a QLISA set up the same way (``register()`` and, when the
        state has optimizers, ``insert_hook()`` called).

        Raises:
            ValueError: a state of another model or other settings (layers, gamma, interval), or of
                layers with other shapes.
            RuntimeError: before :meth:`register` or after :meth:`finalize`.
        """
        self._check_not_finalized("load_state_dict")
        if not self._layers:
            raise RuntimeError("call QLISADiffusion.register() (and insert_hook()) before load_state_dict().")
        if state["settings"] != self._settings():
            raise ValueError(
                f"the QLISA state is of other settings {state['settings']}; this QLISA has {self._settings()}."
            )
        self.global_step = int(state["global_step"])
        self._uncounted_by_step = int(state["uncounted_by_step"])
        self._resample_due = bool(state["resample_due"])
        self.sampler.generator.set_state(state["sampler"])
        wanted = {self.layer_names.index(name) for name in state["active"]}
        self._deactivate([i for i in self._active if i not in wanted])
        self._activate(sorted(wanted - set(self._active)))
        for name, layer in self._layers.items():
            layer.load_state_dict(state["layers"][name])
        if set(state["optimizers"]) != set(self.named_optimizers()):
            raise ValueError(
                "the QLISA state's optimizers do not match its active layers; call insert_hook()."
            )
        for name, saved in state["optimizers"].items():
            param = self._parameter(name)
            self.optimizers.optimizer_of(param).load_state_dict(saved["optimizer"])
            self.optimizers.scheduler_of(param).load_state_dict(saved["scheduler"])

    # ---- internals -------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"layers": list(self.layer_names), "gamma": self.sampler.gamma, "interval": self.interval}

    def _parameter(self, name: str) -> nn.Parameter:
        layer, attr = name.rsplit(".", 1)
        return getattr(self._layers[layer], attr)

    def _count_step(self) -> None:
        """One optimizer step done (the hooks call this at the end of each backward)."""
        self.global_step += 1
        self._uncounted_by_step += 1
        if self.global_step % self.interval == 0:
            self._resample_due = True

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self.optimizers.reset_backward()
        self._apply_due_resample()

    def _apply_due_resample(self) -> None:
        if self._resample_due:
            self._resample_due = False
            self._resample()

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
