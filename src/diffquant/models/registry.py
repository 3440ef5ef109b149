"""Registry of `ArchSpec`s by class name, with a generic fallback for any `nn.Module`."""

from __future__ import annotations

from torch import nn

from diffquant.models.spec import ArchSpec

_REGISTRY: dict[str, ArchSpec] = {}


def _generic_blocks(model: nn.Module) -> list[str]:
    """Top-level children that hold weights (parameters or buffers — quantized layers keep their
    packed weights as buffers), in registration order.

    Registration order is taken as execution order; a model whose ``forward`` visits its children in a
    different order should register an `ArchSpec` with its own ``block_prefixes``.
    """
    return [
        name
        for name, child in model.named_children()
        if next(child.parameters(), None) is not None or next(child.buffers(), None) is not None
    ]


GENERIC_SPEC = ArchSpec(name="generic", timestep_arg=None, keep_fp=(), block_prefixes=_generic_blocks)


def register_arch(cls: str | type, spec: ArchSpec, *, replace: bool = False) -> None:
    """Register ``spec`` for models whose class (or a base class) is named ``cls``.

    Args:
        cls: A class or its ``__name__`` (matching is by name so diffusers need not be imported).
        spec: The architecture facts.
        replace: Allow overriding an existing registration (for example to change the default
            ``keep_fp`` of a diffusers class).

    Raises:
        ValueError: if ``cls`` is already registered and ``replace`` is False.
        TypeError: if ``spec`` is not an `ArchSpec`.

    Example:
        >>> register_arch("MyDenoiser", ArchSpec("MyDenoiser", "t", (r"head",), lambda m: ["body"]))
    """
    name = cls if isinstance(cls, str) else cls.__name__
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_arch({name!r}, ...): expected an ArchSpec, got {type(spec).__name__}.")
    if name in _REGISTRY and not replace:
        raise ValueError(f"An ArchSpec is already registered for {name!r}; pass replace=True to override it.")
    _REGISTRY[name] = spec


def get_arch_spec(model: nn.Module) -> ArchSpec:
    """The `ArchSpec` of ``model``: the first registered class name along its MRO, else `GENERIC_SPEC`.

    The generic spec has no timestep argument, keeps nothing in higher precision, and uses the top-level
    children that contain Linear/Conv2d layers as calibration blocks.
    """
    for cls in type(model).__mro__:
        spec = _REGISTRY.get(cls.__name__)
        if spec is not None:
            return spec
    return GENERIC_SPEC
