"""The CPU backends raced per network: PyTorch eager, OpenVINO (the engine's ``--backend openvino``), ONNX Runtime
and torch.compile, at the batch size the neural engine uses on a CPU, on synthetic checkpoints.

    python benchmarks/backends.py [--checkpoints DIR] [--threads 2] [--repeat 2] [--only DNet ...]
        [--skip onnxruntime torch.compile]

Per network and backend: ms per forward pass (median of ``--repeat`` after one warm-up), the one-time cost
(conversion and compilation; torch.compile's first call), the max abs error against eager with whether it
passes the selftest's fp32 rule (the check the engine adopts a converted model by), and the arithmetic rate:
the network's floating-point operations per item (torch's FLOP counter) over the time, as a share of this
CPU's fp32 peak (a large matrix product on the same threads). A backend that fails says why in one line.
Last, the floor: the neural engine's network arithmetic per output frame (retalk.bench.NETWORK_CALLS) at that
peak, against the reference's network seconds per frame. onnxruntime is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from models import NETWORKS, SYNTHETIC, build_network
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from retalk import checkpoints
from retalk.bench import NETWORK_CALLS, default_reference_timing, reference_costs
from retalk.device import batch_size
from retalk.engines import backends
from retalk.engines.neural_steps import ITEM_MB, enet_noise_shapes

# the networks' names in neural_steps.ITEM_MB (their CPU batch size); the others run at batch 1
ENGINE_NAMES = {
    "DNet": "dnet",
    "ENet": "enet",
    "face3d_recon": "face3d",
    "GFPGANv1.3": "gfpgan",
    "GPEN-BFR-512": "gpen",
    "ParseNet": "parsenet",
    "GANimation_gen": "ganimation",
}
RACE = ("openvino", "onnxruntime", "torch.compile")


def engine_batch(name: str) -> int:
    return batch_size(torch.device("cpu"), ITEM_MB[ENGINE_NAMES[name]]) if name in ENGINE_NAMES else 1


def call_inputs(name: str, batch: int) -> tuple[tuple, dict]:
    """(args, kwargs) of the forward call as the engine makes it (E-Net with explicit noise maps)."""
    network = NETWORKS[name]
    inputs = network.inputs(batch, network.side)
    if name == "ENet":
        mel, img = inputs
        noise = [
            torch.randn(batch, 1, h, w, generator=torch.Generator().manual_seed(2))
            for h, w in enet_noise_shapes()
        ]
        return (mel, img, img[:, 3:]), {"noise": noise}
    return inputs, {}


def median_ms(run: Callable[[], object], repeat: int) -> float:
    run()
    return statistics.median(timed(run) for _ in range(repeat)) * 1000


def gflop_per_item(model: torch.nn.Module, args: tuple, kwargs: dict) -> float:
    """Floating-point operations (multiply and add counted apart) of one item's forward pass, in GFLOP."""
    one = pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) else t, (args, kwargs))
    # outside inference_mode/no_grad: there the counter fails on GFPGAN's and GPEN's custom autograd ops
    with FlopCounterMode(display=False) as counter:
        model(*one[0], **one[1])
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(side: int = 4096, repeat: int = 5) -> float:
    """This CPU's fp32 rate on torch's threads: the best of ``repeat`` (side x side) matrix products."""
    a, b = torch.rand(side, side), torch.rand(side, side)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeat))
    return 2 * side**3 / best / 1e9


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def openvino_runner(model: torch.nn.Module, leaves: list, in_spec, folder: Path) -> Callable[[list], list]:
    compiled, per_item = backends.export(model, leaves, in_spec, folder / "model.xml")
    request = compiled.create_infer_request()
    return lambda flat: backends.run_compiled(request, flat, per_item)


def onnxruntime_runner(model: torch.nn.Module, leaves: list, in_spec, folder: Path) -> Callable[[list], list]:
    import onnxruntime

    path = folder / "model.onnx"
    names = [f"in{i}" for i in range(len(leaves))]
    # the exporter prints the whole graph when it fails: the row's one line says why
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            backends._Flat(model, in_spec),
            tuple(leaves),
            str(path),
            input_names=names,
            dynamic_axes={n: {0: "batch"} for n in names},
            dynamo=False,
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(flat: list) -> list:
        outputs = session.run(None, {n: t.numpy() for n, t in zip(names, flat, strict=True)})
        return [torch.from_numpy(o) for o in outputs]

    return run


def compiled_runner(model: torch.nn.Module, leaves: list, in_spec, folder: Path) -> Callable[[list], list]:
    flat = torch.compile(backends._Flat(model, in_spec))
    with torch.inference_mode():
        flat(*leaves)  # compiles

    def run(inputs: list) -> list:
        with torch.inference_mode():
            return list(flat(*inputs))

    return run


RUNNERS = {"openvino": openvino_runner, "onnxruntime": onnxruntime_runner, "torch.compile": compiled_runner}


def race(name: str, folder: Path, repeat: int, skip: set[str], peak: float) -> tuple[list[str], float]:
    """The table's lines for one network, and its GFLOP per item."""
    network = NETWORKS[name]
    checkpoints.synth(folder, network.files)
    model = build_network(network.files, folder)
    batch = engine_batch(name)
    args, kwargs = call_inputs(name, batch)
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    with torch.inference_mode():
        expected = pytree.tree_leaves(model(*args, **kwargs))
        eager_ms = median_ms(lambda: model(*args, **kwargs), repeat)
    gflop = gflop_per_item(model, args, kwargs)

    def rate(ms: float) -> str:
        gflops = gflop * batch / (ms / 1000)
        return f"{gflops:>9.0f}{100 * gflops / peak:>6.0f}%"

    lines = [
        f"{name:<16}{batch:>3}{gflop:>8.1f}  {'eager':<14}{eager_ms:>10.0f}{rate(eager_ms)}{'-':>9}{'-':>10}  -"
    ]
    for backend in RACE:
        if backend in skip:
            continue
        with tempfile.TemporaryDirectory(prefix="retalk-race-") as tmp:
            start = time.perf_counter()
            try:
                run = RUNNERS[backend](model, leaves, in_spec, Path(tmp))
                setup = time.perf_counter() - start
                got = run(leaves)
                ms = median_ms(lambda run=run: run(leaves), repeat)
            except Exception as err:  # a backend that cannot take the network is a row that says why
                text = (str(err).strip().splitlines() or [""])[0][:90]
                lines.append(f"{'':<27}  {backend:<14}{'failed':>10}  {type(err).__name__}: {text}")
                continue
        passed, _ = backends.agreement(expected, got)
        error = max(float((e.float() - g.float()).abs().max()) for e, g in zip(expected, got, strict=True))
        verdict = "pass" if passed else "FAIL"
        lines.append(
            f"{'':<27}  {backend:<14}{ms:>10.0f}{rate(ms)}{setup:>9.1f}{error:>10.1e}  {verdict} ({eager_ms / ms:.1f}x)"
        )
        del run
    return lines, gflop


def floor_lines(gflop: dict[str, float], peak: float) -> list[str]:
    """The neural engine's network seconds per output frame if every network ran at ``peak``, beside the
    reference's measured seconds (timing.json); empty unless every network the engine calls was raced."""
    needed = {c.timing for c in NETWORK_CALLS.values() if c.neural_first or c.neural_second}
    if not needed <= gflop.keys():
        return []
    reference = reference_costs(default_reference_timing())
    lines = [f"floor at {peak:.0f} GFLOP/s (the matrix product's rate), per output frame:"]
    for take in ("first", "second"):
        work = sum(
            getattr(c, f"neural_{take}") * gflop[c.timing]
            for c in NETWORK_CALLS.values()
            if c.timing in needed
        )
        line = f"  {take} take: {work:.0f} GFLOP, at least {work / peak:.2f} s"
        if reference["found"]:
            cost = reference["total_s_per_frame"]["reference"]
            line += f"; the reference's {cost:.2f} s is at most {cost / (work / peak):.2f}x that"
        lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=SYNTHETIC)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    parser.add_argument("--skip", nargs="+", choices=RACE, default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeat} after 1 warm-up; "
          f"fp32 peak {peak:.0f} GFLOP/s")  # fmt: skip
    print(
        f"{'network':<16}{'b':>3}{'GFLOP':>8}  {'backend':<14}{'ms':>10}{'GFLOP/s':>9}{'peak':>7}"
        f"{'setup s':>9}{'max abs':>10}  fp32 rule"
    )
    gflop = {}
    for name in args.only:
        lines, gflop[name] = race(name, args.checkpoints, args.repeat, set(args.skip), peak)
        print("\n".join(lines), flush=True)
    print("\n".join(floor_lines(gflop, peak)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
