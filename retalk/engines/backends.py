"""Where the neural engine's networks run on the CPU: PyTorch eager, or OpenVINO (1.4-2x faster per forward pass
of the engine's networks on the CPU in fp32, near the CPU's peak; benchmarks/backends.py races them).

:func:`openvino_network` wraps a network in a callable with the torch module's call signature and output
structure (``dnet(source, driving)["fake_image"]``, ``enet(mel, img, ref, noise=[...])[0]``, ...). Nothing is
converted up front: the first call of each network with a given input signature (the tensors' dtypes and
shapes without the batch dimension, and how they nest in the arguments) finds its OpenVINO model in the store
folder, or converts the network on that call's inputs, checks the converted model against eager on them with
the selftest's fp32 rule, and writes the model and the verdict there. A network that fails to convert or to
agree stays on torch, and a later process reads that verdict instead of trying again. A process that finds a
model never builds the torch network, so its memory holds one copy of the weights, not two.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from retalk_protocol.options import JOB_OPTIONS
from torch import nn
from torch.utils import _pytree as pytree

import retalk
from retalk.cache import cache_key, default_cache_dir
from retalk.checkpoints import file_identity
from retalk.errors import InputError

# auto: OpenVINO on the CPU in fp32 when it is installed, else torch
BACKENDS = JOB_OPTIONS["backend"].choices
STORE_FORMAT = 1  # bump when what the store holds changes meaning

_log = logging.getLogger(__name__)


@functools.cache
def _openvino() -> Any | None:
    """The openvino module, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


@functools.cache
def _core() -> Any:
    return _openvino().Core()


@functools.cache
def _say_once(message: str) -> None:
    _log.warning(message)


def choose_backend(choice: str, device: torch.device, precision: str) -> str:
    """The backend ("torch" or "openvino") that runs the networks for ``choice`` (one of :data:`BACKENDS`);
    OpenVINO runs on the CPU in fp32 only."""
    if choice not in BACKENDS:
        raise InputError(f"--backend {choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "openvino":
        if device.type != "cpu":
            raise InputError(
                f"--backend openvino runs on the CPU, not {device}; use --device cpu or --backend torch"
            )
        if precision != "fp32":
            raise InputError(
                f"--backend openvino runs fp32, not {precision}; use --precision fp32 or --backend torch"
            )
        if _openvino() is None:
            raise InputError(
                "--backend openvino: openvino is not installed; pip install openvino, or --backend torch"
            )
        return "openvino"
    if device.type != "cpu" or precision != "fp32":
        return "torch"
    if _openvino() is None:
        _say_once("backend: openvino is not installed; the networks run on torch (pip install openvino)")
        return "torch"
    return "openvino"


def default_store() -> Path:
    """Where converted models are kept: one folder per machine in retalk's cache folder (they depend on the
    checkpoint files and the OpenVINO version only, so every job and cache folder shares them). Its own
    folder, named so that the artifact cache's size budget never evicts them; delete it to reclaim the space."""
    return default_cache_dir() / "openvino"


def files_identity(paths: Sequence[Path]) -> str:
    """The identity of a network's checkpoint files (name, size, modification time of each): a converted
    model is valid while it holds."""
    return repr([file_identity(p) for p in paths])


class _Flat(nn.Module):
    """``module`` called with the flat list of its input tensors, returning the flat tuple of its outputs: the
    form a converter traces."""

    def __init__(self, module: nn.Module, in_spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.module = module
        self.in_spec = in_spec

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = pytree.tree_unflatten(list(flat), self.in_spec)
        return tuple(pytree.tree_leaves(self.module(*args, **kwargs)))


def _flatten(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            raise TypeError(
                f"openvino_network: expected batched tensors as inputs, got {type(leaf).__name__}"
            )
    return leaves, spec


def input_signature(leaves: Sequence[torch.Tensor], spec: pytree.TreeSpec) -> str:
    """What a converted model is valid for: how the inputs nest, and each one's dtype and shape after the batch
    dimension (the first dimension of every input, which the model leaves dynamic)."""
    return repr((str(spec), [(str(t.dtype), tuple(t.shape[1:])) for t in leaves]))


def agreement(eager: Sequence[torch.Tensor], converted: Sequence[torch.Tensor]) -> tuple[bool, str]:
    """Whether the converted outputs agree with eager's under the selftest's fp32 rule, and the worst error."""
    from retalk.selftest import compare

    rows = [compare(e, c, output=str(i)) for i, (e, c) in enumerate(zip(eager, converted, strict=True))]
    failed = [r for r in rows if not r.passed]
    worst = max((r.max_abs or 0.0 for r in rows), default=0.0)
    if failed:
        r = failed[0]
        return (
            False,
            f"output {r.output} disagrees with eager: {r.detail} (max abs {r.max_abs}, rel L2 {r.rel_l2})",
        )
    return True, f"max abs error {worst:.3g}"


def convert(
    module: nn.Module, leaves: Sequence[torch.Tensor], in_spec: pytree.TreeSpec, dynamic: bool
) -> Any:
    """The OpenVINO model of ``module`` traced on the flat inputs ``leaves``; ``dynamic``: any batch size, else
    the example's."""
    ov = _openvino()
    shapes = [
        (ov.PartialShape([-1 if dynamic else t.shape[0], *t.shape[1:]]), ov.Type(t.numpy().dtype))
        for t in leaves
    ]
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's advice on data-dependent Python values, and its own deprecation
        warnings.simplefilter("ignore")
        return ov.convert_model(_Flat(module, in_spec), example_input=tuple(leaves), input=shapes)


def export(
    module: nn.Module, leaves: Sequence[torch.Tensor], in_spec: pytree.TreeSpec, xml: Path
) -> tuple[Any, bool]:
    """Write the IR of ``module`` to ``xml`` (and its .bin); its compiled model, and True when that takes one
    item per call.

    A dynamic batch first; when the CPU plugin refuses it (StyleGAN2's modulated convolutions, one group per
    sample, give weights whose shape follows the batch) a model of batch 1, called item by item."""
    _save(convert(module, leaves, in_spec, dynamic=True), xml)
    try:
        return compile_model(xml), False
    except RuntimeError as err:
        _log.info("backend: no dynamic batch (%s); converting for one item per call", _first_line(err))
    _save(convert(module, [t[:1] for t in leaves], in_spec, dynamic=False), xml)
    return compile_model(xml), True


def _save(model: Any, xml: Path) -> None:
    _openvino().save_model(model, xml, compress_to_fp16=False)
    del model  # the converted graph holds a copy of the weights until then
    gc.collect()


def compile_model(model: Any) -> Any:
    """``model`` (an ov.Model or the path of its IR) compiled for the CPU: fp32 (not the bf16 some CPUs would
    pick) on as many threads as torch uses."""
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }
    return _core().compile_model(model, "CPU", config)


def run_compiled(request: Any, leaves: Sequence[torch.Tensor], per_item: bool = False) -> list[torch.Tensor]:
    """The flat outputs of a compiled model's infer request on the flat inputs, as torch tensors; ``per_item``:
    a batch-1 model, run on each item, the outputs concatenated."""
    if per_item:
        items = [run_compiled(request, [t[i : i + 1] for t in leaves]) for i in range(len(leaves[0]))]
        return [torch.cat(outputs) for outputs in zip(*items, strict=True)]
    results = request.infer([np.ascontiguousarray(t.detach().cpu().numpy()) for t in leaves])
    return [torch.from_numpy(np.array(results[output])) for output in request.model_outputs]


class _Compiled:
    """A compiled model with one infer request, reused call after call: its buffers are allocated once, not
    per call (a request per call let the process's memory grow); a lock keeps threads from sharing it at once."""

    def __init__(self, model: Any, out_spec: pytree.TreeSpec, per_item: bool) -> None:
        self.request = model.create_infer_request()
        self.out_spec = out_spec  # how its flat outputs nest, as the torch module returns them
        self.per_item = per_item  # a batch-1 model (see export)
        self._lock = threading.Lock()

    def __call__(self, leaves: Sequence[torch.Tensor]) -> Any:
        with self._lock:
            flat = run_compiled(self.request, leaves, self.per_item)
        return pytree.tree_unflatten(flat, self.out_spec)


class OpenVinoNetwork:
    """A network that runs on OpenVINO where its converted model passed verification, else on torch; called
    like the torch module. ``load`` builds the torch module (only when a conversion or the fallback needs it);
    ``identity`` names its checkpoint files (any change converts afresh)."""

    def __init__(self, name: str, identity: str, load: Callable[[], nn.Module], store: Path) -> None:
        self.name = name
        self.identity = identity
        self._load = load
        self.store = Path(store)
        self._eager: nn.Module | None = None
        self._models: dict[str, _Compiled | None] = {}  # input signature -> its model, or None: torch
        self.on_torch: dict[str, str] = {}  # input signature -> why it stays on torch
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, in_spec = _flatten(args, kwargs)
        signature = input_signature(leaves, in_spec)
        with self._lock:
            if signature not in self._models:
                return self._first_call(signature, leaves, in_spec, args, kwargs)
            model = self._models[signature]
        return self._eager_module()(*args, **kwargs) if model is None else model(leaves)

    def release(self) -> None:
        """Let go of the compiled models and the torch module (their weights' memory); the next call compiles
        the stored model again (about a second, no conversion)."""
        with self._lock:
            self._models.clear()
            self.on_torch.clear()
            self._eager = None
        gc.collect()

    def paths(self, signature: str) -> tuple[Path, Path, Path]:
        """The model's IR (.xml, .bin) and its verdict (.json) for an input signature."""
        key = cache_key("openvino", STORE_FORMAT, retalk.__version__, self.name, self.identity, signature,
                        _openvino().__version__)  # fmt: skip
        stem = f"{Path(self.name).stem}-{key[:24]}"
        return tuple(self.store / f"{stem}.{suffix}" for suffix in ("xml", "bin", "json"))

    def _eager_module(self) -> nn.Module:
        if self._eager is None:
            self._eager = self._load()
        return self._eager

    def _first_call(
        self, signature: str, leaves: list[torch.Tensor], in_spec: pytree.TreeSpec, args: tuple, kwargs: dict
    ) -> Any:
        """Read the verdict and model of this signature, or convert, verify and store them; this call's
        outputs come from the model it adopts (eager's when the network stays on torch)."""
        xml, weights, verdict_path = self.paths(signature)
        verdict = _read_verdict(verdict_path)
        if verdict is not None and verdict["adopted"] and xml.is_file() and weights.is_file():
            model = _Compiled(
                compile_model(xml), pytree.treespec_loads(verdict["out_spec"]), verdict["per_item"]
            )
            self._models[signature] = model
            return model(leaves)
        if verdict is not None and not verdict["adopted"]:
            self._models[signature] = None
            self.on_torch[signature] = verdict["detail"]
            return self._eager_module()(*args, **kwargs)
        # said before the wait: a large network takes minutes, once per machine and checkpoint
        _log.warning(
            "backend: converting %s for OpenVINO, once on this machine (can take minutes; --backend torch skips it)",
            self.name,
        )
        eager = self._eager_module()
        with torch.inference_mode():
            expected = eager(*args, **kwargs)
        start = time.perf_counter()
        expected_leaves, out_spec = pytree.tree_flatten(expected)
        converted, detail = self._convert(eager, leaves, in_spec, expected_leaves, xml, weights)
        seconds = time.perf_counter() - start
        per_item = converted is not None and converted[1]
        _write_verdict(verdict_path, converted is not None, detail, seconds, out_spec, per_item)
        if converted is None:
            self._models[signature] = None
            self.on_torch[signature] = detail
            _log.warning("backend: %s stays on torch: %s", self.name, detail)
            return expected
        compiled, per_item, got = converted
        self._models[signature] = _Compiled(compiled, out_spec, per_item)
        self._eager = None  # the compiled model holds the weights now
        del eager
        gc.collect()
        _log.info("backend: %s runs on OpenVINO (converted in %.0f s, %s)", self.name, seconds, detail)
        # the converted model's numbers from the first call on: a frame renders the same in any call
        return pytree.tree_unflatten(got, out_spec)

    def _convert(
        self,
        eager: nn.Module,
        leaves: list[torch.Tensor],
        in_spec: pytree.TreeSpec,
        expected: list[torch.Tensor],
        xml: Path,
        weights: Path,
    ) -> tuple[tuple[Any, bool, list[torch.Tensor]] | None, str]:
        """Convert and verify against ``expected`` (eager's flat outputs); when they agree, move the IR into
        place and return (the compiled model, whether it runs item by item, its outputs), else None: stay on
        torch; and how well it agreed, or why not."""
        self.store.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=self.store) as folder:
            tmp_xml = Path(folder) / "model.xml"
            try:
                compiled, per_item = export(eager, leaves, in_spec, tmp_xml)
                got = run_compiled(compiled.create_infer_request(), leaves, per_item)
            except Exception as err:  # any converter failure leaves the network on torch
                return None, f"conversion failed ({type(err).__name__}: {_first_line(err)})"
            adopted, detail = agreement(expected, got)
            if not adopted:
                return None, detail
            os.replace(tmp_xml.with_suffix(".bin"), weights)
            os.replace(tmp_xml, xml)
        return (compiled, per_item, got), detail


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _read_verdict(path: Path) -> dict | None:
    try:
        verdict = json.loads(path.read_text())
        return verdict if {"adopted", "out_spec", "per_item"} <= verdict.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def _write_verdict(
    path: Path, adopted: bool, detail: str, seconds: float, out_spec: pytree.TreeSpec, per_item: bool
) -> None:
    """The verdict last, renamed into place: a reader that finds it finds the IR whole."""
    text = json.dumps(
        {
            "adopted": adopted,
            "detail": detail,
            "convert_s": round(seconds, 1),
            "out_spec": pytree.treespec_dumps(out_spec),
            "per_item": per_item,
        }
    )
    fd, tmp = tempfile.mkstemp(prefix=".verdict-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_NETWORKS: dict[tuple, OpenVinoNetwork] = {}
_NETWORKS_LOCK = threading.Lock()


def openvino_network(name: str, identity: str, load: Callable[[], nn.Module], store: Path) -> OpenVinoNetwork:
    """The :class:`OpenVinoNetwork` of ``name`` whose files have ``identity``, one per process (a server keeps
    its compiled models warm, as :func:`retalk.checkpoints.load` keeps the torch networks)."""
    key = (name, identity, str(store))
    with _NETWORKS_LOCK:
        if key not in _NETWORKS:
            _NETWORKS[key] = OpenVinoNetwork(name, identity, load, store)
        return _NETWORKS[key]


def clear_networks() -> None:
    """Forget every network :func:`openvino_network` made (their compiled models are freed)."""
    with _NETWORKS_LOCK:
        _NETWORKS.clear()
