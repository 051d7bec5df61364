"""Loud checkpoint errors, the same for every network: a missing key, a truncated file, another network's file.

Each row saves the reference-shaped state dict (every official key, all ones) in the network's official
container. What only one network does (extra keys tolerated, unused heads dropped, spectral-norm vectors,
unexpected keys refused) is tested in that network's own file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from retalk.errors import CheckpointError
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

ShapedStateDict = Callable[[str], dict[str, Tensor]]


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

# (network, another network's official keys, in the network's own container (else in theirs), the message after
# "<network's file>: ")
FOREIGN = [
    ("face3d_pretrain_epoch_20.pth", "s3fd-619a316812.pth", False, r"\d+ missing key"),
    ("30_net_gen.pth", "face3d_pretrain_epoch_20.pth", False, "right file"),
    ("ParseNet-latest.pth", "s3fd-619a316812.pth", False, "right file"),
    ("RetinaFace-R50.pth", "face3d_pretrain_epoch_20.pth", False, "right file"),
    ("s3fd-619a316812.pth", "GFPGANv1.3.pth", False, "right file"),
    ("GFPGANv1.3.pth", "GPEN-BFR-512.pth", True, "right file"),
    ("GPEN-BFR-512.pth", "GFPGANv1.3.pth", True, "right file"),
    ("DNet.pt", "LNet.pth", False, "'net_G_ema'"),
    ("LNet.pth", "DNet.pt", False, "'state_dict'"),
    ("LNet.pth", "ENet.pth", True, r"\d+ missing key"),
    ("ENet.pth", "GFPGANv1.3.pth", True, "right file"),
]


def _save(folder: Path, row: OfficialFile, content: object, shaped: ShapedStateDict) -> Path:
    """``content`` as ``row``'s file in ``folder``, beside complete copies of the files its loader also reads."""
    for other in row.beside:
        torch.save(FILES[other].wrap(shaped(other)), folder / other)
    torch.save(content, folder / row.name)
    return folder / row.name


@pytest.mark.parametrize("name", FILES)
def test_missing_key_is_named(
    name: str, reference_shaped_state_dict: ShapedStateDict, tmp_path: Path
) -> None:
    row, shaped = FILES[name], reference_shaped_state_dict(name)
    assert isinstance(
        row.load(_save(tmp_path, row, row.wrap(shaped), reference_shaped_state_dict)), nn.Module
    )
    del shaped[row.drop]
    path = _save(tmp_path, row, row.wrap(shaped), reference_shaped_state_dict)
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(name)}: 1 missing key\(s\): {re.escape(row.reported)};"
    ):
        row.load(path)


@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_named(
    name: str, reference_shaped_state_dict: ShapedStateDict, tmp_path: Path
) -> None:
    row = FILES[name]
    path = _save(tmp_path, row, row.wrap(reference_shaped_state_dict(name)), reference_shaped_state_dict)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"^{re.escape(f'{name}: {path} is truncated')}"):
        row.load(path)


@pytest.mark.parametrize(("name", "other", "own_container", "says"), FOREIGN)
def test_another_networks_file_is_named(
    name: str,
    other: str,
    own_container: bool,
    says: str,
    reference_shaped_state_dict: ShapedStateDict,
    tmp_path: Path,
) -> None:
    row = FILES[name]
    wrap = row.wrap if own_container else FILES[other].wrap
    path = _save(tmp_path, row, wrap(reference_shaped_state_dict(other)), reference_shaped_state_dict)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(name)}: .*{says}"):
        row.load(path)
