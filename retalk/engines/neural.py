"""The neural re-dub engine: VideoReTalking's networks behind the pipeline's :class:`Engine` protocol.

``prepare`` (video only; cached by decoded content, track, expression and checkpoint identity):
  1. 3DMM coefficients: the head crops of every frame -> face3d (:func:`coefficient_rows`);
  2. reference faces, chunk by chunk: D-Net re-renders each crop with the template expression, GPEN enhances it,
     the STIT paste puts it back into its frame, cropped at the E-Net box -> 384 references
     (:func:`reference_faces`; one cache file per chunk, so memory never grows with the clip).
``listen`` (audio only): one mel window per output frame.
``render_chunk`` (per chunk, batched; :func:`render_faces`): E-Net lower face -> optional GANimation upper face
  -> paste -> GFPGAN -> mouth-mask blend -> face-parse paste onto the original, all on a region around the face
  at its own resolution: every pixel outside that region is the decoded source, bit for bit (docs/DESIGN.md,
  deviation 6).

Every stage takes its geometry from a :class:`~retalk.engines.geometry.FaceGeometry` of the clip's face track
and its noise as tensors; ``retalk selftest --pipeline`` drives the same functions with the reference's recorded
geometry and noise (docs/DESIGN.md lists where and why the engine differs from the reference).
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image

import retalk
from retalk import checkpoints, media
from retalk.audio import mel_chunks_for_frames, melspectrogram
from retalk.cache import ArtifactCache, cache_key
from retalk.checkpoints.catalogue import DNET, ENET, EXPRESSION, FACE3D, GANIMATION, GFPGAN, GPEN, PARSENET
from retalk.device import autocast, check_precision, resolve_device
from retalk.engines import SourceClip, backends, options_ignored_by, torch_steps
from retalk.engines import neural_steps as steps
from retalk.engines.geometry import FaceGeometry, nearest_found
from retalk.errors import CheckpointError, InputError
from retalk.models.ganimation import expression_aus
from retalk.pipeline.request import RedubRequest
from retalk.tracking import track_faces

PREPARE_FORMAT = 2  # bump when anything prepare stores changes meaning
PREP_CHUNK = 16  # frames per reference cache file
CACHE_KIND = "neural"
EXPRESSION_KEYS = {"neutral": "expression_center", "smile": "expression_mouth"}
PREPARE_CHECKPOINTS = (FACE3D, DNET, GPEN, PARSENET)
PREPARE_ONLY = (FACE3D, DNET, GPEN)  # the networks render never calls (ParseNet it does)
ENET_NOISE, GFPGAN_NOISE = 0, 1  # noise streams of one output frame


# (stage output name, value): how ``retalk selftest --pipeline`` sees the images between the stages
Trace = Callable[[str, object], None]


def _no_trace(name: str, value: object) -> None:
    pass


def _crops256(frames: np.ndarray, geometry: FaceGeometry) -> np.ndarray:
    return np.stack(
        [steps.crop_resized(f, b, steps.CROP_SIZE) for f, b in zip(frames, geometry.crop_boxes, strict=True)]
    )


def coefficient_rows(
    face3d: torch.nn.Module, frames: np.ndarray, geometry: FaceGeometry, device: torch.device
) -> np.ndarray:
    """(n, 262) coefficient rows of frames with a face (RGB) and their geometry rows."""
    return steps.face3d_rows(face3d, _crops256(frames, geometry), geometry.crop_landmarks, device)


def reference_faces(
    dnet: torch.nn.Module,
    gpen: torch.nn.Module,
    parsenet: torch.nn.Module,
    frames: np.ndarray,
    geometry: FaceGeometry,
    semantic: np.ndarray,
    indices: Sequence[int],
    expression: np.ndarray,
    device: torch.device,
    trace: Trace = _no_trace,
) -> np.ndarray:
    """(n, 384, 384, 3) E-Net references of frames with a face; ``indices`` are their rows in ``semantic``
    (the clip's coefficients, read by D-Net's window)."""
    # 1. D-Net re-renders the head crop with the template expression
    stabilized = steps.stabilize(dnet, _crops256(frames, geometry), semantic, indices, expression, device)
    trace("dnet_out", stabilized)
    # 2. GPEN enhances it
    enhanced = steps.enhance_references(
        gpen, parsenet, stabilized, geometry.enhance_points, geometry.enhance_boxes, device
    )
    trace("gpen_enhanced", enhanced)
    # 3. pasted back into its frame, cropped at the E-Net box
    return steps.reference_crops(
        frames, geometry.crop_boxes, enhanced, geometry.stit_quads, geometry.enet_boxes
    )


def _with_area(frame: np.ndarray, area: steps.BlendArea, image: np.ndarray) -> np.ndarray:
    out = frame.copy()
    x1, y1, x2, y2 = area.box
    out[y1:y2, x1:x2] = image
    return out


def render_faces(
    enet: torch.nn.Module,
    gfpgan: torch.nn.Module,
    parsenet: torch.nn.Module,
    frames: np.ndarray,
    geometry: FaceGeometry,
    mel: np.ndarray,
    references: np.ndarray,
    enet_noise: Sequence[torch.Tensor],
    gfpgan_noise: Sequence[torch.Tensor],
    areas: Sequence[steps.BlendArea],
    device: torch.device,
    upper_face: tuple[torch.nn.Module, torch.Tensor] | None = None,
    trace: Trace = _no_trace,
    image_ops: str = "auto",
) -> np.ndarray:
    """Frames (n, H, W, 3) RGB with a face, lip-synced to their mel windows (n, 80, 16); each face is
    post-processed in its blend area. ``upper_face``: GANimation and its action units. ``image_ops``: the
    image work between the networks in NumPy/OpenCV ("opencv", the parity path) or in torch on ``device``
    ("torch"); "auto" takes torch on CUDA (retalk.engines.torch_steps.image_ops)."""
    if torch_steps.image_ops(device, image_ops) == "torch":
        return torch_steps.render_faces(
            enet, gfpgan, parsenet, frames, geometry, mel, references, enet_noise, gfpgan_noise, areas, device,
            upper_face, None if trace is _no_trace else trace,
        )  # fmt: skip
    boxes = geometry.enet_boxes
    # 1. E-Net: the lower half of each face from its mel window and reference
    faces = np.stack([steps.crop_resized(f, b, steps.FACE_SIZE) for f, b in zip(frames, boxes, strict=True)])
    pred = steps.lip_sync(enet, mel, faces, references, enet_noise, device)
    # 2. optional upper-face expression
    if upper_face is not None:
        pred = steps.edit_upper_face(upper_face[0], faces, pred, upper_face[1], device)
    trace("pred", pred)
    # 3. paste, then GFPGAN on the face aligned from its 5 points, pasted back
    pasted = steps.paste_faces(frames, boxes, pred)
    crops, matrices = steps.gfpgan_align(pasted, geometry.restore_points)
    restored = steps.restore_gfpgan(gfpgan, crops, gfpgan_noise, device)
    restored = [
        steps.paste_back_restored(p, r, m, a)
        for p, r, m, a in zip(pasted, restored, matrices, areas, strict=True)
    ]
    trace("gfpgan_pasted", restored)
    # 4. the mouth and lips of GFPGAN's face blended into the pasted face
    local_boxes = [a.local(b) for a, b in zip(areas, boxes, strict=True)]
    mouths = steps.mouth_masks(parsenet, restored, local_boxes, device)
    mouth_blended = [
        steps.blend_in_area(r, steps.cut(p, a.box), m, a.size, steps.MOUTH_LEVELS)
        for r, p, m, a in zip(restored, pasted, mouths, areas, strict=True)
    ]
    del pasted
    trace("pp", mouth_blended)
    # 5. the face-parse paste onto the original frame, from GPEN's crop of the whole mouth-blended frame
    aligned, inverses = zip(
        *(
            steps.gpen_align(_with_area(f, a, m)[None], p[None])
            for f, a, m, p in zip(frames, areas, mouth_blended, geometry.paste_points, strict=True)
        ),
        strict=True,
    )
    aligned, inverses = np.concatenate(aligned), np.concatenate(inverses)
    masks = steps.parse_faces(parsenet, aligned, steps.FACE_LABELS, device)
    final = steps.face_parse_paste(aligned, masks, inverses, frames, boxes, areas)
    out = frames.copy()
    for frame, area, face in zip(out, areas, final, strict=True):
        x1, y1, x2, y2 = area.box
        frame[y1:y2, x1:x2] = face
    return out


class NeuralEngine:
    """VideoReTalking's D-Net / E-Net / GPEN / GFPGAN pipeline on the geometry of the clip's face track."""

    name = "neural"
    ignores = options_ignored_by("neural")
    fast_encode = False  # the networks dominate: the encoder's time buys a smaller file

    def __init__(self, request: RedubRequest) -> None:
        self.request = request
        self.device = resolve_device(request.device)
        check_precision(self.device, request.precision)
        self._backend = backends.choose_backend(request.backend, self.device, request.precision)
        self._autocast = functools.partial(autocast, self.device, request.precision)
        self._aus = expression_aus(request.upper_face) if request.upper_face != "none" else None
        self._clip: SourceClip | None = None
        self._cache: ArtifactCache | None = None
        self._private_dir: tempfile.TemporaryDirectory | None = None
        self._key = ""
        self._geometry: FaceGeometry | None = None
        self._semantic: np.ndarray | None = None
        self._expression: np.ndarray | None = None
        self._mel: np.ndarray | None = None
        self._references: tuple[int, np.ndarray] | None = None  # (chunk index, refs) of the last chunk read

    # --- models and keys ---------------------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> Path:
        return checkpoints.find_checkpoint(name, self.request.checkpoints)

    def _file_identity(self, name: str) -> str:
        return checkpoints.file_identity(self._checkpoint(name))

    def _network(self, name: str) -> Callable:
        """The network of the official file ``name``, loaded once per process (a server keeps it warm), on the
        request's backend: the torch module, or its OpenVINO model (converted on its first call, then kept in
        the machine's model store; retalk.engines.backends)."""
        if self._backend == "torch":
            return checkpoints.load(name, self.request.checkpoints, device=self.device)
        spec = checkpoints.get_spec(name)
        paths = tuple(checkpoints.find_checkpoint(n, self.request.checkpoints) for n in spec.files)
        # built afresh, outside checkpoints.load's per-process cache: freed once its model is compiled
        build = functools.partial(checkpoints.resolve_loader(spec), *paths, device=self.device)
        identity = backends.files_identity(paths)
        return backends.openvino_network(name, identity, build, backends.default_store())

    def _release(self, names: Sequence[str]) -> None:
        """Free the compiled OpenVINO models of networks this take no longer calls, so that the render's
        networks do not share the memory with them; a later call (a server's next clip) compiles the stored
        model again in about a second. Torch modules stay in checkpoints.load's cache."""
        if self._backend == "openvino":
            for name in names:
                self._network(name).release()

    def _expression_identity(self) -> tuple:
        if self.request.expression in EXPRESSION_KEYS:
            return self.request.expression, self._file_identity(EXPRESSION)
        image = Path(self.request.expression)
        return (
            "image",
            hashlib.sha256(image.read_bytes()).hexdigest(),
            self._file_identity(FACE3D),
        )

    def _prepare_key(self, clip: SourceClip) -> str:
        return cache_key(
            "neural-prepare",
            PREPARE_FORMAT,
            retalk.__version__,
            clip.content_key,
            clip.track.digest(),
            self._expression_identity(),
            self.request.precision,
            self._backend,  # the backends' numbers differ in the last bits
            *(self._file_identity(n) for n in PREPARE_CHECKPOINTS),
        )

    def _seed(self, output_index: int, stream: int) -> int:
        """A frame's noise seed from (request seed, output frame, stream): re-renders are identical."""
        return int(np.random.SeedSequence([self.request.seed, output_index, stream]).generate_state(1)[0])

    # --- Engine protocol ----------------------------------------------------------------------------------------

    def prepare(self, clip: SourceClip, report: Callable[[str, int, int], None]) -> list[str]:
        """Coefficients and reference faces of the clip (from the cache when these frames were prepared
        before with the same track, expression and checkpoints); returns the names of the cache hits."""
        self._clip = clip
        if not clip.track.found.any():
            return []  # nothing to render: the pipeline passes every frame through
        self._cache = clip.cache if clip.cache is not None else self._private_cache()
        self._key = self._prepare_key(clip)
        self._geometry = FaceGeometry.from_track(clip.track, clip.info.width, clip.info.height)
        hits = []

        # 1. 3DMM coefficients of every frame (small: 262 floats a frame)
        self._semantic = self._read_cached(cache_key(self._key, "coefficients"), "semantic")
        if self._semantic is not None:
            hits.append("coefficients")
        else:
            self._semantic = self._coefficients(clip, report)
            self._cache.put(
                CACHE_KIND,
                cache_key(self._key, "coefficients"),
                lambda p: np.savez(p, semantic=self._semantic),
            )

        # 2. reference faces, one cache entry per chunk
        chunks = range(0, clip.end - clip.start, PREP_CHUNK)
        missing = [a for a in chunks if self._cache.get(CACHE_KIND, self._chunk_key(a)) is None]
        for done, a in enumerate(missing):
            report("references", done, len(missing))
            self._store_references(a)
        report("references", len(missing), len(missing))
        if not missing:
            hits.append("references")
        # when prepare's networks ran, their memory goes before the render
        if "coefficients" not in hits or missing:
            self._release(PREPARE_ONLY)
        return hits

    def listen(self, wav16k: np.ndarray, rate: Fraction, n_frames: int) -> list[str]:
        self._mel = mel_chunks_for_frames(melspectrogram(wav16k), rate, n_frames)
        return []

    def render_chunk(
        self, frames: np.ndarray, source_index: np.ndarray, output_index: np.ndarray
    ) -> np.ndarray:
        """Clip frames ``source_index`` lip-synced as output frames ``output_index``; faceless ones unchanged."""
        if self._clip is None or self._mel is None:
            raise RuntimeError("NeuralEngine.prepare() and listen() must run before render_chunk()")
        local = np.asarray(source_index) - self._clip.start
        rows = np.flatnonzero(self._clip.track.found[local])
        out = frames.copy()
        if len(rows) == 0:
            return out
        height, width = frames.shape[1:3]
        geometry = self._geometry.rows(local[rows])
        outputs = [int(i) for i in np.asarray(output_index)[rows]]
        enet = self._network(ENET)
        gfpgan = self._network(GFPGAN)
        parsenet = self._network(PARSENET)
        upper_face = None
        if self._aus is not None:
            upper_face = self._network(GANIMATION), self._aus
        with torch.inference_mode(), self._autocast():
            out[rows] = render_faces(
                enet,
                gfpgan,
                parsenet,
                frames[rows],
                geometry,
                self._mel[outputs],
                np.stack([self._reference(int(local[k])) for k in rows]),
                steps.per_frame_noise(
                    [self._seed(i, ENET_NOISE) for i in outputs], steps.enet_noise_shapes(), self.device
                ),
                steps.per_frame_noise(
                    [self._seed(i, GFPGAN_NOISE) for i in outputs],
                    steps.gfpgan_noise_shapes(),
                    self.device,
                ),
                [steps.face_area(b, width, height) for b in geometry.enet_boxes],
                self.device,
                upper_face,
            )
        return out

    # --- prepare's stages ---------------------------------------------------------------------------------------

    def _private_cache(self) -> ArtifactCache:
        """Without a user cache the prepared chunks still go to disk (memory stays bounded), in a folder
        removed with the engine."""
        self._private_dir = tempfile.TemporaryDirectory(prefix="retalk-neural-")
        return ArtifactCache(Path(self._private_dir.name), max_bytes=1 << 62)

    def _read_cached(self, key: str, field: str) -> np.ndarray | None:
        """A cached array, or None when absent or damaged (a damaged entry is deleted, to be recomputed)."""
        path = self._cache.get(CACHE_KIND, key)
        if path is None:
            return None
        try:
            with np.load(path) as data:
                return data[field]
        except (OSError, ValueError, KeyError, EOFError):
            path.unlink(missing_ok=True)
            return None

    def _chunk_key(self, a: int) -> str:
        return cache_key(self._key, "references", a, PREP_CHUNK)

    def _coefficients(self, clip: SourceClip, report: Callable[[str, int, int], None]) -> np.ndarray:
        face3d = self._network(FACE3D)
        found = clip.track.found
        semantic = np.zeros((len(found), 262), np.float32)
        with torch.inference_mode(), self._autocast():
            for chunk in media.iter_frames(clip.path, clip.start, clip.end, chunk_size=PREP_CHUNK):
                local = chunk.start - clip.start + np.arange(len(chunk.frames))
                keep = found[local]
                if keep.any():
                    semantic[local[keep]] = coefficient_rows(
                        face3d, chunk.frames[keep], self._geometry.rows(local[keep]), self.device
                    )
                report("coefficients", int(local[-1]) + 1, len(found))
        # faceless frames borrow a neighbour's row for D-Net's window (docs/DESIGN.md, deviation 4)
        return semantic[nearest_found(found)]

    def _template(self) -> np.ndarray:
        """The 64 expression coefficients every reference face is re-rendered with."""
        if self._expression is not None:
            return self._expression
        if self.request.expression in EXPRESSION_KEYS:
            path = self._checkpoint(EXPRESSION)
            try:
                self._expression = scipy.io.loadmat(str(path))[EXPRESSION_KEYS[self.request.expression]][0]
            except (OSError, ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: not a readable {EXPRESSION} ({err}); fetch it again") from err
            self._expression = self._expression.astype(np.float32)
            return self._expression
        image = np.asarray(Image.open(self.request.expression).convert("RGB"))
        track = track_faces([image])
        if not track.found[0]:
            raise InputError(f"--expression {self.request.expression}: no face found in the image")
        face3d = self._network(FACE3D)
        with torch.inference_mode(), self._autocast():
            self._expression = steps.expression_from_image(face3d, image, track.landmarks[0], self.device)
        return self._expression

    def _store_references(self, a: int) -> np.ndarray:
        """Reference faces of clip frames [a, a + PREP_CHUNK), computed and stored in the cache."""
        clip = self._clip
        b = min(a + PREP_CHUNK, clip.end - clip.start)
        frames = np.concatenate(
            [
                c.frames
                for c in media.iter_frames(clip.path, clip.start + a, clip.start + b, chunk_size=PREP_CHUNK)
            ]
        )
        local = np.arange(a, b)
        keep = clip.track.found[local]
        references = np.zeros((b - a, steps.FACE_SIZE, steps.FACE_SIZE, 3), np.uint8)
        if keep.any():
            with torch.inference_mode(), self._autocast():
                references[keep] = reference_faces(
                    self._network(DNET),
                    self._network(GPEN),
                    self._network(PARSENET),
                    frames[keep],
                    self._geometry.rows(local[keep]),
                    self._semantic,
                    local[keep],
                    self._template(),
                    self.device,
                )
        self._cache.put(CACHE_KIND, self._chunk_key(a), lambda p: np.savez(p, references=references))
        return references

    def _reference(self, i: int) -> np.ndarray:
        """The 384 reference of clip frame ``i`` (a chunk evicted from the cache meanwhile is recomputed)."""
        a = i - i % PREP_CHUNK
        if self._references is None or self._references[0] != a:
            references = self._read_cached(self._chunk_key(a), "references")
            self._references = a, references if references is not None else self._store_references(a)
        return self._references[1][i - a]
