"""Weight and activation formats from command-line flags (shared by ``quantize`` and ``calibrate``)."""

from __future__ import annotations

import argparse

from diffquant.config import ActivationQuantConfig, WeightQuantConfig
from diffquant.nn.act_quant import ActivationQuantizer


def activation_modes() -> list[str]:
    """The registered activation modes (``static``, ``dynamic``, ``logsnr``...), sorted."""
    return sorted(ActivationQuantizer.registry)


def weight_config(args: argparse.Namespace) -> WeightQuantConfig:
    """The :class:`WeightQuantConfig` of the ``quantize`` flags (``--weights``, ``--method``...).

    Raises:
        ValueError: INT-only flags with NF4, ``--block-size`` with INT weights, or an invalid config.
    """
    granularity = "group" if args.group_size else args.granularity
    if args.weights == "nf4":
        if (
            args.group_size
            or args.asymmetric
            or args.granularity != "channel"
            or args.range_method != "minmax"
        ):
            raise ValueError(
                "--group-size, --asymmetric, --granularity and --range-method apply to INT weights; NF4 takes "
                "--block-size only."
            )
        block_size = 64 if args.block_size is None else args.block_size
        return WeightQuantConfig(
            format="nf4", bits=4, block_size=block_size, method=args.method, **_calibration_options(args)
        )
    if args.block_size is not None:
        raise ValueError(
            f"--block-size is the NF4 block size; it does not apply to --weights {args.weights}."
        )
    return WeightQuantConfig(
        bits=int(args.weights.removeprefix("int")),
        granularity=granularity,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        range_method=args.range_method,
        method=args.method,
        **_calibration_options(args),
    )


def _calibration_options(args: argparse.Namespace) -> dict:
    """GPTQ / Qronos settings."""
    return {"damping": args.damping, "act_order": args.act_order, "sequential": args.sequential}


def activation_config(spec: str) -> ActivationQuantConfig | None:
    """``"none"`` → ``None``; ``"int8-static"`` → 8-bit static activations; ``"int4-logsnr"``...

    Raises:
        ValueError: a spec not of the form ``INTn-MODE``, an unknown mode, or bits outside 2..8.
    """
    if spec == "none":
        return None
    bits, _, mode = spec.partition("-")  # e.g. "int8-static"
    if not bits.startswith("int") or not bits[3:].isdigit() or not mode:
        raise ValueError(
            f"--activations {spec!r}: expected 'none' or INTn-MODE such as 'int8-static', 'int8-dynamic', "
            "'int4-logsnr'."
        )
    if mode not in ActivationQuantizer.registry:
        raise ValueError(
            f"--activations {spec!r}: unknown mode {mode!r}; choose one of {activation_modes()}."
        )
    return ActivationQuantConfig(bits=int(bits[3:]), mode=mode)
