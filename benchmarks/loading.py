"""Per-network load time through ``retalk.checkpoints.load``, on synthetic checkpoints, and what construction
with random initialisation would add (the loaders build on the meta device instead).

    python benchmarks/loading.py [--checkpoints DIR] [--repeat 3] [--threads 2] [--only FILE ...]

Columns: the module built with random weights (what the loaders no longer do) and on the meta device; a full
load (find, read, build, fill: the cache emptied first); a second load in the same process (the cache).
The checkpoints are written by ``retalk.checkpoints.synth`` (cached between runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import torch
from models import SYNTHETIC
from torch import nn

from retalk import checkpoints
from retalk.checkpoints import catalogue
from retalk.models.dnet import DNet
from retalk.models.enet import ENet
from retalk.models.face3d import ReconNet
from retalk.models.ganimation import GANimationGenerator
from retalk.models.gfpgan import GFPGANv1Clean
from retalk.models.gpen import GPEN
from retalk.models.lnet import LNet
from retalk.models.parsing import ParseNet
from retalk.models.retinaface import RetinaFace
from retalk.models.s3fd import S3FD

MODULES: dict[str, Callable[[], nn.Module]] = {
    catalogue.LNET: LNet,
    catalogue.ENET: lambda: ENet(lnet=nn.Identity()),  # its L-Net: the L-Net row
    catalogue.DNET: DNet,
    catalogue.FACE3D: ReconNet,
    catalogue.GFPGAN: GFPGANv1Clean,
    catalogue.GPEN: GPEN,
    catalogue.PARSENET: ParseNet,
    catalogue.RETINAFACE: RetinaFace,
    catalogue.S3FD: S3FD,
    catalogue.GANIMATION: GANimationGenerator,
}


def seconds(call: Callable[[], object], repeat: int, before: Callable[[], None] = lambda: None) -> float:
    """Median of ``repeat`` timed calls, ``before`` run untimed ahead of each."""
    return statistics.median(timeit.repeat(call, setup=before, repeat=repeat, number=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=SYNTHETIC)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(MODULES), default=list(MODULES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU, median of {args.repeat}")
    print(f"{'file':<30}{'random init s':>14}{'meta s':>8}{'load s':>8}{'cached s':>10}")
    for name in args.only:
        checkpoints.synth(args.checkpoints, checkpoints.get_spec(name).files)
        build = MODULES[name]

        def on_meta(build: Callable[[], nn.Module] = build) -> nn.Module:
            with torch.device("meta"):
                return build()

        def load(name: str = name) -> nn.Module:
            return checkpoints.load(name, args.checkpoints)

        random_s = seconds(build, args.repeat)
        meta_s = seconds(on_meta, args.repeat)
        load_s = seconds(load, args.repeat, before=checkpoints.clear_loaded)
        cached_s = seconds(load, args.repeat)
        checkpoints.clear_loaded()
        print(f"{name:<30}{random_s:>14.3f}{meta_s:>8.3f}{load_s:>8.3f}{cached_s:>10.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
