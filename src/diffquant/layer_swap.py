"""Put new layers in place of a model's selected ones: every method's last step after
:func:`diffquant.targeting.select_targets` (``quantize_``, QAT, TuneQDM, QLISA)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def replace_layers(
    model: nn.Module, names: Iterable[str], build: Callable[[str, nn.Module], nn.Module]
) -> dict[str, nn.Module]:
    """Replace each named layer by ``build(name, layer)``, in place.

    Every replacement is built before the first one is swapped in, so an error while building leaves
    ``model`` unchanged.

    Returns:
        The new layers by name, in the order of ``names``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> new = replace_layers(model, ["0"], lambda name, layer: nn.Identity())
        >>> type(model[0]).__name__
        'Identity'
    """
    built = {name: build(name, model.get_submodule(name)) for name in names}
    for name, layer in built.items():
        model.set_submodule(name, layer)
    return built
