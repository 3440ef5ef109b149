"""GPTQ and Qronos as weight methods of :func:`diffquant.quantize_` (``WeightQuantConfig(method=...)``).

Both run :func:`~diffquant.ptq.sequential.calibrate_sequentially` over the recorded calibration calls
and solve each layer with :func:`~diffquant.ptq.gptq.gptq_quantize` (H from quantized-path inputs X̃:
"GPTQ-sequential") or :func:`~diffquant.ptq.qronos.qronos_quantize` (H and the float/quantized cross
term G). Ill-conditioned Hessians get more damping (adaptive per-layer damping, seed 003); a Cholesky
failure after the automatic retries raises — there is no silent fallback to round-to-nearest. Each
layer's loss, damping, retries and condition number are recorded in ``model.diffquant_calibration``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from torch import nn

from diffquant.api import register_weight_method
from diffquant.config import WeightQuantConfig
from diffquant.errors import NumericalWarning
from diffquant.nn.packed import IntPackedWeight
from diffquant.ptq.calibration import DenoiserCall
from diffquant.ptq.gptq import QuantResult, gptq_quantize
from diffquant.ptq.hessian import InputStatistics, condition_number, dead_inputs
from diffquant.ptq.paths import float_weight_of
from diffquant.ptq.qronos import qronos_quantize
from diffquant.ptq.sequential import calibrate_sequentially

logger = logging.getLogger(__name__)

ILL_CONDITIONED = 1e7
"""Condition number above which a layer's damping is multiplied by :data:`DAMPING_BOOST`."""
DAMPING_BOOST = 10.0


def _solve_layer(
    algorithm: str, name: str, layer: nn.Module, stats: InputStatistics, config: WeightQuantConfig
):
    float_weight = float_weight_of(layer)
    W = float_weight.reshape(float_weight.shape[0], -1).float()  # (out, in*kh*kw)
    cfg = config.for_layer(W.shape[1])
    H = stats.H.to(W.device)
    if dead_inputs(H).all():  # GPTQ zeroes the columns of inputs that never fire: here every column
        warnings.warn(
            f"layer {name!r}: every calibration input reaching it was zero (or underflowed to zero), so "
            f"{algorithm} would zero its whole weight; kept at round-to-nearest. Check the calibration data.",
            NumericalWarning,
            stacklevel=2,
        )
        return {"loss": float("nan"), "damping": 0.0, "retries": 0, "condition": float("nan"), "rtn": True}
    cond = condition_number(H)
    damping = cfg.damping * (DAMPING_BOOST if cond > ILL_CONDITIONED else 1.0)
    common = {
        "bits": cfg.bits,
        "symmetric": cfg.symmetric,
        "granularity": cfg.granularity,
        "group_size": cfg.group_size,
        "percdamp": damping,
        "act_order": cfg.act_order,
        "static_groups": cfg.act_order and cfg.granularity == "group",
        "range_method": cfg.range_method,
    }
    if algorithm == "qronos":
        result: QuantResult = qronos_quantize(W, H, stats.G.to(W.device), **common)
    else:
        result = gptq_quantize(W, H, **common)
    layer.qweight = IntPackedWeight.from_codes(
        layer.qweight.shape, result.q, result.scale, result.zero_point, cfg.bits, cfg.symmetric
    ).to(W.device)
    if result.retries:
        logger.warning(
            "%s: Cholesky needed %d damping retries (damping %.3g)", name, result.retries, result.damping
        )
    return {"loss": result.loss, "damping": result.damping, "retries": result.retries, "condition": cond}


def _second_order(algorithm: str):
    def method(
        model: nn.Module,
        layers: dict[str, nn.Module],
        configs: dict[str, WeightQuantConfig],
        calls: list[DenoiserCall],
    ):
        not_int = sorted(n for n in layers if configs[n].format != "int")
        if not_int:
            raise ValueError(
                f"weight method {algorithm!r} quantizes INT weights, but {not_int[:3]} are "
                f"{configs[not_int[0]].format}; use method='rtn' for format='nf4'."
            )
        modes = sorted({configs[n].sequential for n in layers})
        if len(modes) > 1:
            raise ValueError(
                f"the layers quantized with {algorithm!r} ask for different sequential modes {modes}; "
                "one calibration pass serves them all, so give them the same WeightQuantConfig.sequential."
            )
        solvable = {n: m for n, m in layers.items() if getattr(m, "groups", 1) == 1}
        report: dict[str, Any] = {
            "method": algorithm,
            "sequential": modes[0],
            "calls": len(calls),
            "layers": {n: {"method": "rtn (grouped conv)"} for n in layers if n not in solvable},
        }
        for name in report["layers"]:
            logger.warning("%s is a grouped convolution: kept at round-to-nearest (no %s)", name, algorithm)

        def solve(name: str, layer: nn.Module, stats: InputStatistics) -> None:
            report["layers"][name] = {
                "method": algorithm,
                **_solve_layer(algorithm, name, layer, stats, configs[name]),
            }

        start = time.perf_counter()
        calibrate_sequentially(
            model,
            solvable,
            calls,
            solve,
            sequential=modes[0],
            need_float_inputs=algorithm == "qronos",
        )
        report["seconds"] = time.perf_counter() - start
        model.diffquant_calibration = report

    method.__doc__ = f"{algorithm} weight calibration over the recorded calls (see module docstring)."
    return method


register_weight_method("gptq", needs_calibration=True)(_second_order("gptq"))
register_weight_method("qronos", needs_calibration=True)(_second_order("qronos"))
