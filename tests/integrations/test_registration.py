"""Registration: diffusers knows "diffquant" after import; the after-import hook; copies and pickles."""

import copy
import pickle
import subprocess
import sys

import torch
from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import diffquant
from diffquant import QuantConfig, WeightQuantConfig
from diffquant.integrations._import_hooks import when_imported
from diffquant.integrations.diffusers import DiffQuantConfig, DiffQuantQuantizer
from diffquant.models.tiny import example_inputs, tiny_unet2d_condition


def test_import_diffquant_registers_the_backend():
    assert AUTO_QUANTIZER_MAPPING["diffquant"] is DiffQuantQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["diffquant"] is DiffQuantConfig


def test_import_diffquant_first_registers_once_diffusers_and_peft_load():
    code = (
        "import sys, diffquant\n"
        "assert 'diffusers' not in sys.modules and 'peft' not in sys.modules  # import diffquant stays light\n"
        "import diffusers.quantizers.auto as auto, peft.tuners.lora.model as lora\n"
        "print(auto.AUTO_QUANTIZER_MAPPING['diffquant'].__name__, lora.LoraModel._create_new_module._diffquant)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["DiffQuantQuantizer", "True"]


def test_when_imported_runs_after_the_first_import(tmp_path, monkeypatch):
    (tmp_path / "dq_probe_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("dq_probe_module", lambda: seen.append(sys.modules["dq_probe_module"].VALUE))
    assert seen == []
    import dq_probe_module  # noqa: F401

    assert seen == [1]
    when_imported("dq_probe_module", lambda: seen.append(2))  # already imported: runs at once
    assert seen == [1, 2]
    sys.modules.pop("dq_probe_module")


def test_quantize_marks_diffusers_models_and_they_copy_and_pickle():
    unet = diffquant.quantize_(tiny_unet2d_condition(), QuantConfig(weights=WeightQuantConfig(bits=8)))
    assert isinstance(unet.hf_quantizer, DiffQuantQuantizer)
    assert unet.config.quantization_config.layers
    inputs = example_inputs(unet, batch_size=1, timesteps=[3])
    for clone in (copy.deepcopy(unet), pickle.loads(pickle.dumps(unet))):
        with torch.no_grad():
            assert torch.equal(clone(**inputs).sample, unet(**inputs).sample)
