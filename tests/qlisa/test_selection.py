"""QLISA chooses its layers through diffquant.targeting; the architecture defaults only on request."""

from torch import nn

from diffquant.models import get_arch_spec
from diffquant.models.tiny import tiny_unet2d
from diffquant.qlisa import QLISADiffusion, QLISALayer
from diffquant.targeting import LayerSelection, select_targets


def test_every_layer_by_default_and_the_architecture_defaults_with_keep_fp_none():
    model = tiny_unet2d()
    everything = QLISADiffusion(model, gamma=2)
    assert everything.layer_names == select_targets(model, LayerSelection(keep_fp=())).quantize
    assert everything.layer_names[0] == "conv_in" and everything.layer_names[-1] == "conv_out"  # LISA's ends
    arch = QLISADiffusion(tiny_unet2d(), gamma=2, keep_fp=None, exclude=[r"mid_block\..*"]).register()
    assert all(
        not get_arch_spec(model).is_kept_fp(n) and not n.startswith("mid_block") for n in arch.layer_names
    )
    assert type(arch.model.conv_in) is nn.Conv2d and isinstance(
        arch.model.down_blocks[0].resnets[0].conv1, QLISALayer
    )
    finalized = arch.finalize()
    assert finalized.diffquant_config.keep_fp is None and finalized.diffquant_config.exclude == (
        r"mid_block\..*",
    )
