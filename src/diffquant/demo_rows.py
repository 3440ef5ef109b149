"""The method rows of ``diffquant demo``: each row is a name and the config that makes it.

Later methods add rows here (never remove them), so the benchmark table grows with the library.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffquant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig


@dataclass(frozen=True)
class DemoRow:
    """One row of the benchmark table.

    Attributes:
        name: row name in the table and file names (``[A-Za-z0-9_-]``).
        method: short description of the method.
        config: the quantization config, or ``None`` for the float model.
        calibrated: whether the row needs calibration samples from the float model.
    """

    name: str
    method: str
    config: QuantConfig | None = None

    @property
    def calibrated(self) -> bool:
        acts = self.config.activations if self.config is not None else None
        return acts is not None and acts.mode == "static"

    @property
    def weights_label(self) -> str:
        return self.config.weights.label if self.config is not None else "fp32"

    @property
    def activations_label(self) -> str:
        acts = self.config.activations if self.config is not None else None
        return acts.label if acts is not None else "fp32"


_INT8_STATIC = ActivationQuantConfig(bits=8, mode="static")

DEMO_ROWS: tuple[DemoRow, ...] = (
    DemoRow("fp32", "float model"),
    DemoRow(
        "w8a8",
        "RTN per-channel INT8 weights, static per-tensor INT8 activations (min-max)",
        QuantConfig(weights=WeightQuantConfig(bits=8), activations=_INT8_STATIC),
    ),
    DemoRow(
        "w4a8-rtn",
        "RTN per-channel INT4 weights, static INT8 activations",
        QuantConfig(weights=WeightQuantConfig(bits=4, symmetric=False), activations=_INT8_STATIC),
    ),
    DemoRow(
        "w4a16-rtn-g64",
        "RTN INT4 weights in groups of 64 (per-channel where 64 does not divide a layer's inputs), weight-only",
        QuantConfig(
            weights=WeightQuantConfig(
                bits=4, granularity="group", group_size=64, symmetric=False, fallback_granularity="channel"
            )
        ),
    ),
    DemoRow(
        "nf4",
        "NF4 weights, block 64, double-quantized absmax, weight-only",
        QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, block_size=64, double_quant=True)),
    ),
)
