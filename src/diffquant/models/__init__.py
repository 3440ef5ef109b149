"""Per-architecture knowledge as data: timestep argument, default keep-FP layers, calibration blocks.

`get_arch_spec(model)` looks the model's class (and its bases) up by name; the diffusers defaults are
registered on import without importing diffusers. Tiny diffusers models for tests and benchmarks live
in `diffquant.models.tiny` (which does import diffusers).
"""

from diffquant.models import diffusers_archs as _diffusers_archs  # noqa: F401  (registers the defaults)
from diffquant.models.registry import GENERIC_SPEC, get_arch_spec, register_arch
from diffquant.models.spec import ArchSpec

__all__ = ["GENERIC_SPEC", "ArchSpec", "get_arch_spec", "register_arch"]
