"""The method rows of ``diffquant demo``: each row is a name and the config that makes it.

Later methods add rows here (never remove them), so the benchmark table grows with the library.
Transfer rows re-use another row's quantized model, unchanged, under a different sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffquant.bench.recipes import FINETUNE_RECIPES
from diffquant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from diffquant.efficientdm import EfficientDMConfig

SAMPLERS = ("ddim", "dpm")
"""``ddim``: DDIM (η = 0); ``dpm``: DPM-Solver++ multistep (2nd order)."""


@dataclass(frozen=True)
class DemoRow:
    """One row of the benchmark table.

    Attributes:
        name: row name in the table and file names (``[A-Za-z0-9_-]``).
        method: short description of the method.
        config: the quantization config, or ``None`` for the float model.
        sampler: ``"ddim"`` or ``"dpm"`` (see :data:`SAMPLERS`).
        num_steps: sampling steps (``None``: the demo's default, 50).
        transfer_of: name of an earlier row whose quantized model is re-used without recalibration.
        finetune: recipe in :data:`diffquant.bench.recipes.FINETUNE_RECIPES` that builds the model by
            fine-tuning (``config`` then names the bit-widths it targets).
    """

    name: str
    method: str
    config: QuantConfig | None = None
    sampler: str = "ddim"
    num_steps: int | None = None
    transfer_of: str | None = None
    finetune: str | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"row {self.name}: sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.finetune is not None and (self.finetune not in FINETUNE_RECIPES or self.config is None):
            raise ValueError(
                f"row {self.name}: finetune must be one of {sorted(FINETUNE_RECIPES)} and needs a config "
                f"naming its bit-widths, got {self.finetune!r} with config {self.config!r}."
            )

    @property
    def weights_label(self) -> str:
        return self.config.weights.label if self.config is not None else "fp32"

    @property
    def activations_label(self) -> str:
        acts = self.config.activations if self.config is not None else None
        return acts.label if acts is not None else "fp32"


def _config(bits: int, method: str, act_bits: int | None, act_mode: str = "static", **weights) -> QuantConfig:
    acts = ActivationQuantConfig(bits=act_bits, mode=act_mode) if act_bits is not None else None
    return QuantConfig(
        weights=WeightQuantConfig(bits=bits, method=method, **weights),
        activations=acts,
    )


def _second_order(bits: int, method: str, act_bits: int, act_mode: str = "static") -> QuantConfig:
    # asymmetric per-channel weights, calibrated layer by layer on the quantized network
    return _config(bits, method, act_bits, act_mode, symmetric=False, sequential="layer")


_W4A4_MODES = {"static": "static ranges", "steptable": "per-step table", "logsnr": "log-SNR TDQ"}

DEMO_ROWS: tuple[DemoRow, ...] = (
    DemoRow("fp32", "float model"),
    DemoRow(
        "w8a8",
        "RTN per-channel INT8 weights, static per-tensor INT8 activations (min-max)",
        _config(8, "rtn", 8),
    ),
    DemoRow(
        "w4a8-rtn",
        "RTN per-channel INT4 weights, static INT8 activations",
        _config(4, "rtn", 8, symmetric=False),
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
    DemoRow(
        "w4a8-gptq",
        "GPTQ (layer-sequential) INT4 weights, static INT8 activations",
        _second_order(4, "gptq", 8),
    ),
    DemoRow(
        "w4a8-qronos",
        "Qronos (layer-sequential) INT4 weights, static INT8 activations",
        _second_order(4, "qronos", 8),
    ),
    DemoRow("w8a8-logsnr", "RTN INT8 weights, log-SNR TDQ INT8 activations", _config(8, "rtn", 8, "logsnr")),
    DemoRow(
        "w4a8-qronos-logsnr",
        "Qronos INT4 weights, log-SNR TDQ INT8 activations",
        _second_order(4, "qronos", 8, "logsnr"),
    ),
    *(
        DemoRow(
            f"w4a4-qronos-{mode}",
            f"Qronos INT4 weights, INT4 activations with {what}",
            _second_order(4, "qronos", 4, mode if mode != "steptable" else "step_table"),
        )
        for mode, what in _W4A4_MODES.items()
    ),
    DemoRow("fp32-dpm20", "float model, DPM-Solver++ 20 steps", sampler="dpm", num_steps=20),
    *(
        DemoRow(
            f"w4a4-qronos-{mode}-dpm20",
            f"the w4a4-qronos-{mode} model (calibrated on DDIM-50) sampled with DPM-Solver++ 20 steps",
            sampler="dpm",
            num_steps=20,
            transfer_of=f"w4a4-qronos-{mode}",
        )
        for mode in _W4A4_MODES
    ),
    *(
        DemoRow(
            f"w4a{act}-efficientdm",
            f"EfficientDM: W4A{act} PTQ start (first/last W8A8), QALoRA + scale-aware LR + TALSQ, "
            "distilled from the float model, merged",
            EfficientDMConfig(weight_bits=4, act_bits=act).quant_config(),
            finetune="efficientdm",
        )
        for act in (4, 8)
    ),
    *(
        DemoRow(
            f"w{bits}-tuneqdm",
            f"TuneQDM: frozen INT{bits} weights, 4 timestep-aware scale experts distilled from the float model",
            QuantConfig(weights=WeightQuantConfig(bits=bits, symmetric=False)),
            finetune="tuneqdm",
        )
        for bits in (8, 4)
    ),
    DemoRow(
        "nf4-qlisa",
        "QLISA: NF4 frozen layers, layerwise-sampled fine-tune on the digits data",
        QuantConfig(weights=WeightQuantConfig(format="nf4", bits=4, block_size=64, double_quant=True)),
        finetune="qlisa",
    ),
    DemoRow(
        "w4a8-qat",
        "QAT: LSQ fake-quant W4A8 trained from the float model on the digits data, converted",
        _config(4, "rtn", 8, symmetric=False),
        finetune="qat",
    ),
)
