"""Each official checkpoint file: its name, its loader and the container the official file wraps its state dict in.

Shared by test_checkpoint_errors.py (loud errors) and test_golden.py (golden outputs through the selftest cases).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from retalk.models.dnet import load_dnet
from retalk.models.enet import load_enet
from retalk.models.face3d import load_face3d
from retalk.models.ganimation import load_ganimation
from retalk.models.gfpgan import load_gfpgan
from retalk.models.gpen import load_gpen
from retalk.models.lnet import load_lnet
from retalk.models.parsing import load_parsenet
from retalk.models.retinaface import load_retinaface
from retalk.models.s3fd import load_s3fd

StateDictFor = Callable[[str], dict[str, Tensor]]  # an official file's name -> a state dict with its keys


def _plain(state_dict: dict[str, Tensor]) -> object:
    return state_dict


def _under(container_key: str) -> Callable[[dict[str, Tensor]], object]:
    return lambda state_dict: {container_key: state_dict}


@dataclass(frozen=True)
class OfficialFile:
    name: str  # every message must name it
    load: Callable[[Path], nn.Module]
    wrap: Callable[[dict[str, Tensor]], object]  # the official container around a state dict
    drop: str  # an official key to leave out ...
    reported: str  # ... and the module's name for it, which the error must give
    beside: tuple[str, ...] = ()  # other official files the loader reads from the same folder


FILES = {
    row.name: row
    for row in [
        OfficialFile(
            "face3d_pretrain_epoch_20.pth",
            load_face3d,
            _under("net_recon"),
            "final_layers.3.bias",
            "final_layers.3.bias",
        ),
        OfficialFile("30_net_gen.pth", load_ganimation, _plain, "model.15.weight", "decoder.0.weight"),
        OfficialFile(
            "ParseNet-latest.pth",
            load_parsenet,
            _plain,
            "encoder.1.shortcut_func.conv2d.weight",
            "encoder.1.shortcut.conv2d.weight",
        ),
        OfficialFile(
            "RetinaFace-R50.pth",
            load_retinaface,
            _plain,
            "ssh2.conv7x7_3.0.weight",
            "ssh2.conv7x7_3.0.weight",
        ),
        OfficialFile("s3fd-619a316812.pth", load_s3fd, _plain, "conv4_3_norm.weight", "conv4_3_norm.weight"),
        OfficialFile(
            "GFPGANv1.3.pth",
            load_gfpgan,
            _under("params_ema"),
            "stylegan_decoder.style_convs.3.modulated_conv.modulation.bias",
            "decoder.style_convs.3.conv.modulation.bias",
        ),
        OfficialFile(
            "GPEN-BFR-512.pth",
            load_gpen,
            _plain,
            "generator.convs.5.noise.weight",
            "decoder.style_convs.5.noise_strength",
        ),
        OfficialFile(
            "DNet.pt",
            load_dnet,
            _under("net_G_ema"),
            "warpping_net.flow_out.2.bias",
            "warping_net.flow_conv.bias",
        ),
        OfficialFile(
            "LNet.pth",
            load_lnet,
            _under("state_dict"),
            "decoder.res1.res4.conv2.bn_g.mlp_beta.bias",
            "decoder.res_blocks.1.4.conv2.norm_g.mlp_beta.bias",
        ),
        OfficialFile(
            "ENet.pth",
            lambda path: load_enet(path, path.with_name("LNet.pth")),
            _under("state_dict"),
            "style_convs.2.weight",
            "style_convs.2.noise_strength",
            beside=("LNet.pth",),
        ),
    ]
}


def save_official(folder: Path, row: OfficialFile, content: object, state_dict_for: StateDictFor) -> Path:
    """``content`` as ``row``'s file in ``folder``, beside the files its loader also reads, each holding
    ``state_dict_for(its name)`` in its official container."""
    for other in row.beside:
        torch.save(FILES[other].wrap(state_dict_for(other)), folder / other)
    torch.save(content, folder / row.name)
    return folder / row.name
