"""Resumable training: checkpoints every N steps that restore a run bit for bit.

A training checkpoint is one file ``<directory>/step-<00000050>.safetensors``
(:mod:`diffquant.finetune.state_file`: tensors + JSON, atomic, checksummed, never pickled) holding
everything the next steps depend on:

- ``model``: the model's training tensors (:func:`training_tensors`: every parameter that requires
  gradients and every buffer outside frozen packed weights, e.g. LSQ ranges, observer statistics);
- ``optimizer`` / ``lr_scheduler`` / ``method``: their ``state_dict()`` (``method`` is state a fine-tuning
  method keeps besides the model, e.g. QLISA's sampled layers and per-parameter optimizers);
- ``rng``: torch CPU (and CUDA, when initialised), Python ``random`` and NumPy global states;
- ``loop``: the loop's own position: step, losses so far, its generator (data order, timesteps, noise)
  and, for distillation, the trajectory in progress;
- ``fingerprint``: what the run was started with (the loop's settings, the model's structure and frozen
  weights, the optimizer's hyper-parameters). Resuming another run is a :class:`CheckpointError` naming
  the field, checked before anything is changed.

Only the last ``keep_last`` files are kept. A run resumed from the checkpoint of step N and continued to
step K gives the same tensors, bit for bit on CPU, as an uninterrupted run to K.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from diffquant.errors import CheckpointError
from diffquant.finetune.state_file import read_state_file, write_state_file
from diffquant.nn.packed import PackedWeight
from diffquant.safefile import checksum

_FILE = re.compile(r"step-(\d{8,})\.safetensors")


class Stateful(Protocol):
    """Anything with PyTorch's ``state_dict()`` / ``load_state_dict(state)`` pair."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class TrainingCheckpoints:
    """Where and how often a training loop checkpoints, and whether it resumes.

    Args:
        directory: folder of the checkpoint files (created when missing).
        every: save after every ``every`` optimizer steps.
        keep_last: how many of the newest checkpoints to keep (older ones are deleted after a save).
        resume: ``True`` (or ``"latest"``): continue from the newest checkpoint in ``directory`` (start
            fresh when there is none); a path: continue from that checkpoint file, or the newest one in
            that folder (it must exist); ``False``: start fresh.

    Raises:
        ValueError: a non-positive ``every`` or ``keep_last``, or a ``resume`` that is neither a boolean
            nor a path.

    Example:
        >>> ckpt = TrainingCheckpoints("runs/dog", every=50, keep_last=2, resume=True)
        >>> fit_denoiser(model, opt, images, cond, sched, steps=400, checkpoint=ckpt)  # doctest: +SKIP
    """

    directory: str | os.PathLike
    every: int
    keep_last: int = 2
    resume: bool | str | os.PathLike = False

    def __post_init__(self) -> None:
        for name in ("every", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingCheckpoints.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.resume, bool | str | os.PathLike):
            raise ValueError(
                f"TrainingCheckpoints.resume must be True / 'latest', False, or a checkpoint path, got "
                f"{self.resume!r}."
            )


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The training checkpoints in ``directory``, oldest step first (empty when there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def training_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What training may change in ``model``: parameters that require gradients and the buffers outside
    frozen packed weights (:class:`~diffquant.nn.packed.PackedWeight` codes never change in training;
    methods that re-quantize, like QLISA, save their layers themselves)."""
    packed = {name for name, m in model.named_modules() if isinstance(m, PackedWeight)}
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, buffer in model.named_buffers():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if buffer is not None and owner not in packed:
            tensors[name] = buffer
    return tensors


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The model's class, every tensor's name / shape / dtype, and a SHA-256 of the tensors training
    does not change (the frozen base the run starts from)."""
    state = model.state_dict(keep_vars=True)
    changing = set(training_tensors(model))
    frozen = {k: v for k, v in state.items() if k not in changing and isinstance(v, Tensor)}
    layout = "\n".join(f"{k}:{v.dtype}:{list(v.shape)}" for k, v in state.items() if isinstance(v, Tensor))
    return {
        "class": type(model).__name__,
        "tensors_sha256": hashlib.sha256(layout.encode()).hexdigest(),
        "trainable": sorted(changing),
        "frozen_sha256": checksum({}, frozen),
    }


def data_fingerprint(*tensors: Any) -> str:
    """SHA-256 of the tensors in ``tensors`` (nested dicts / lists allowed), e.g. images and conditioning."""
    found: dict[str, Tensor] = {}

    def collect(value: Any, path: str) -> None:
        if isinstance(value, Tensor):
            found[path] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                collect(v, f"{path}/{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                collect(v, f"{path}/{i}")

    collect(list(tensors), "")
    return checksum({}, found)


def _optimizer_settings(optimizer: torch.optim.Optimizer | None) -> Any:
    if optimizer is None:
        return None
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": len(g["params"])}
        for g in optimizer.param_groups
    ]
    return json.loads(json.dumps({"class": type(optimizer).__name__, "groups": groups}, default=repr))


def rng_state() -> dict[str, Any]:
    """The global RNG states: torch CPU, CUDA (when initialised), Python ``random`` and NumPy."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: checkpoint {_short(a)}, now {_short(b)}")
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class RunCheckpointer:
    """Saves and restores one training loop's state (used by :func:`~diffquant.finetune.fit_denoiser`
    and :func:`~diffquant.finetune.distill.distill`; a custom loop can use it the same way).

    Args:
        options: where / how often; ``None`` disables everything (no cost).
        model: the model being trained.
        optimizer, lr_scheduler, method_state: saved with ``state_dict()`` (each may be ``None``).
        settings: the loop's settings that decide its results (JSON-ready; resuming with others fails).

    Raises:
        ValueError: checkpoints asked for without an optimizer and without ``method_state`` (the state
            of whatever steps the parameters would be lost).

    Example:
        >>> run = RunCheckpointer(options, model, optimizer, None, None, {"loop": "mine", "lr": 1e-3})
        >>> step, loop = run.restore() or (0, None)  # doctest: +SKIP
        >>> for step in range(step + 1, steps + 1):
        ...     train_one_step()
        ...     run.save_if_due(step, {"losses": losses})  # doctest: +SKIP
    """

    def __init__(
        self,
        options: TrainingCheckpoints | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        lr_scheduler: Stateful | None,
        method_state: Stateful | None,
        settings: dict[str, Any],
    ):
        self.options = options
        if options is None:
            return
        if optimizer is None and method_state is None:
            raise ValueError(
                "checkpointing a loop without an optimizer needs the state of what steps the parameters: "
                "pass method_state (e.g. FinetuneSetup.method_state, the QLISADiffusion object)."
            )
        self.directory = Path(options.directory)
        self.model = model
        self.parts = {
            k: v
            for k, v in {"optimizer": optimizer, "lr_scheduler": lr_scheduler, "method": method_state}.items()
            if v is not None
        }
        self.fingerprint = json.loads(
            json.dumps(
                {
                    "settings": settings,
                    "model": model_fingerprint(model),
                    "optimizer": _optimizer_settings(optimizer),
                    "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                    "parts": sorted(self.parts),
                },
                default=repr,
            )
        )

    def _resume_file(self) -> Path | None:
        resume = self.options.resume
        if resume is False or resume is None:
            return None
        if resume is True or resume == "latest":
            files = checkpoint_files(self.directory)
            return files[-1] if files else None
        path = Path(resume)
        if path.is_dir():
            files = checkpoint_files(path)
            if not files:
                raise CheckpointError(
                    f"resume={str(path)!r} holds no training checkpoint (step-*.safetensors)."
                )
            return files[-1]
        if not path.is_file():
            raise CheckpointError(f"resume={str(path)!r}: no such training checkpoint file.")
        return path

    def restore(self, max_step: int) -> tuple[int, dict[str, Any]] | None:
        """Load the checkpoint ``options.resume`` names into the model, optimizer, scheduler, method
        state and the global RNGs; returns ``(step, loop state)``, or ``None`` when starting fresh.

        Raises:
            CheckpointError: a missing / damaged file, one of a step beyond ``max_step``, or one written
                by a run with other settings, model or optimizer (names each differing field); nothing is
                changed then.
        """
        if self.options is None:
            return None
        file = self._resume_file()
        if file is None:
            return None
        state = read_state_file(file)
        differences = _differences(state.get("fingerprint", {}), self.fingerprint)
        if differences:
            raise CheckpointError(
                f"{file} was written by another training run: {'; '.join(differences[:6])}. Resume with the "
                "same model, method and settings, or start fresh (resume=False or another directory)."
            )
        step = state.get("step")
        if not isinstance(step, int) or not 0 < step <= max_step:
            raise CheckpointError(
                f"{file} is the checkpoint of step {step!r}, beyond this run's {max_step} steps; resume with "
                f"at least {step} steps."
            )
        try:
            self._load(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{file} does not fit this run ({err}); start fresh.") from err
        return step, state["loop"]

    def _load(self, state: dict[str, Any]) -> None:
        for name in ("method", "optimizer", "lr_scheduler"):  # method first: QLISA re-creates parameters
            if name in self.parts:
                self.parts[name].load_state_dict(state[name])
        tensors = training_tensors(self.model)
        saved = state["model"]
        if set(saved) != set(tensors):
            raise ValueError(
                f"training tensors differ: missing {sorted(set(tensors) - set(saved))[:5]}, unexpected "
                f"{sorted(set(saved) - set(tensors))[:5]}"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(saved[name])
        set_rng_state(state["rng"])

    def due(self, step: int) -> bool:
        """Whether :meth:`save_if_due` writes a checkpoint at ``step``."""
        return self.options is not None and step % self.options.every == 0

    def save_if_due(self, step: int, loop: dict[str, Any]) -> Path | None:
        """Write the checkpoint of ``step`` (optimizer steps done) when it is a multiple of ``every``;
        delete all but the newest ``keep_last``. Returns the file written, or ``None``."""
        if not self.due(step):
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "loop": loop,
            "fingerprint": self.fingerprint,
            "model": dict(training_tensors(self.model)),
            "rng": rng_state(),
            **{name: part.state_dict() for name, part in self.parts.items()},
        }
        file = write_state_file(self.directory / f"step-{step:08d}.safetensors", state)
        for old in checkpoint_files(self.directory)[: -self.options.keep_last]:
            old.unlink(missing_ok=True)
        for stale in self.directory.glob(".step-*.safetensors.*.tmp"):  # left by a killed save
            stale.unlink(missing_ok=True)
        return file


def resume_loop(
    run: RunCheckpointer, generator: torch.Generator, steps: int
) -> tuple[int, list[float], dict[str, Any]]:
    """``(steps done, losses so far, loop state)`` of the checkpoint ``run`` resumes, with ``generator``
    set to its saved state; ``(0, [], {})`` when starting fresh. The loop state holds ``"losses"``,
    ``"generator"`` and whatever else the loop saved."""
    restored = run.restore(steps)
    if restored is None:
        return 0, [], {}
    step, loop = restored
    generator.set_state(loop["generator"])
    return step, list(loop["losses"]), loop
