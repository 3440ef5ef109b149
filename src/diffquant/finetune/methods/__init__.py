"""The built-in fine-tuning methods, one module each: a config dataclass and its registered ``prepare``.

- ``fp-full`` (:class:`FullFinetuneConfig`): every parameter; the result stays a float model.
- ``lora`` (:class:`LoRAFinetuneConfig`): peft LoRA on every Linear/Conv2d; a float model.
- ``tuneqdm`` (:class:`TuneQDMFinetuneConfig`): timestep-aware scales of frozen packed INT weights.
- ``qalora`` (:class:`QALoRAFinetuneConfig`): QALoRA on an RTN model; merged quantized layers.
- ``efficientdm`` (:class:`~diffquant.efficientdm.EfficientDMConfig`): calibrated PTQ start, QALoRA,
  scale-aware LR, TALSQ; merged quantized layers (train it with distillation or on data).
- ``qlisa`` (:class:`QLISAFinetuneConfig`): sampled NF4 layers, optimizer in backward; NF4 layers.
- ``qat`` (:class:`QATFinetuneConfig`): fake-quant training; converted packed layers.

Adding a method is one new module here that calls
:func:`~diffquant.finetune.registry.register_finetune_method`, plus its import below.
"""

from diffquant.efficientdm.recipe import EfficientDMConfig
from diffquant.finetune.methods.efficientdm import prepare_efficientdm
from diffquant.finetune.methods.full import FullFinetuneConfig
from diffquant.finetune.methods.lora import LoRAFinetuneConfig
from diffquant.finetune.methods.qalora import QALoRAFinetuneConfig
from diffquant.finetune.methods.qat import QATFinetuneConfig
from diffquant.finetune.methods.qlisa import QLISAFinetuneConfig
from diffquant.finetune.methods.tuneqdm import TuneQDMFinetuneConfig

__all__ = [
    "EfficientDMConfig",
    "FullFinetuneConfig",
    "LoRAFinetuneConfig",
    "QALoRAFinetuneConfig",
    "QATFinetuneConfig",
    "QLISAFinetuneConfig",
    "TuneQDMFinetuneConfig",
    "prepare_efficientdm",
]
