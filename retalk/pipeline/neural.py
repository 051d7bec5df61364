"""The neural re-dub engine: VideoReTalking's networks behind the pipeline's :class:`Engine` protocol.

``prepare`` (video only; cached by decoded content, track, expression and checkpoint identity):
  1. 3DMM coefficients: per-frame FFHQ head box from the (smoothed) face track -> 256 crops -> face3d;
  2. reference faces, chunk by chunk: D-Net re-renders each crop with the template expression, GPEN enhances it,
     it is pasted inside the head quad and cropped at the E-Net box -> 384 references (one cache file per chunk,
     so memory never grows with the clip).
``listen`` (audio only): one mel window per output frame.
``render_chunk`` (per chunk, batched): E-Net lower face -> optional GANimation upper face -> paste -> GFPGAN ->
  mouth-mask blend -> face-parse blend with the original, all on a region around the face at its own
  resolution: every pixel outside that region is the decoded source, bit for bit.
The head box is computed per frame from the smoothed track (the reference fixes one box per clip, D7).
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image

import retalk
from retalk import media
from retalk.audio import mel_chunks_for_frames, melspectrogram
from retalk.device import autocast, check_precision, resolve_device
from retalk.errors import CheckpointError, InputError
from retalk.models.dnet import load_dnet
from retalk.models.enet import load_enet
from retalk.models.face3d import load_face3d
from retalk.models.ganimation import expression_aus, load_ganimation
from retalk.models.gfpgan import load_gfpgan
from retalk.models.gpen import load_gpen
from retalk.models.parsing import load_parsenet
from retalk.pipeline import neural_stages as stages
from retalk.pipeline.cache import ArtifactCache, cache_key
from retalk.pipeline.redub import SourceClip
from retalk.pipeline.request import RedubRequest
from retalk.registry import find_checkpoint
from retalk.tracking import track_faces

PREPARE_FORMAT = 1  # bump when anything prepare stores changes meaning
PREP_CHUNK = 16  # frames per reference cache file
CACHE_KIND = "neural"
EXPRESSION_KEYS = {"neutral": "expression_center", "smile": "expression_mouth"}
PREPARE_CHECKPOINTS = ("face3d_pretrain_epoch_20.pth", "DNet.pt", "GPEN-BFR-512.pth", "ParseNet-latest.pth")
ENET_NOISE, GFPGAN_NOISE = 0, 1  # noise streams of one output frame


@functools.lru_cache(maxsize=16)
def _load(loader: Callable, paths: tuple[Path, ...], identity: tuple, device: str) -> torch.nn.Module:
    """Each network once per process and device (a server keeps them warm); ``identity`` (name, size,
    mtime of every file) makes a replaced checkpoint load afresh."""
    return loader(*paths, device=device)


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return path.name, stat.st_size, stat.st_mtime_ns


def _nearest_found(found: np.ndarray) -> np.ndarray:
    """For each frame, the index of the nearest frame with a face (a faceless frame borrows its row)."""
    with_face = np.flatnonzero(found)
    pos = np.clip(np.searchsorted(with_face, np.arange(len(found))), 1, len(with_face) - 1)
    if len(with_face) == 1:
        return np.full(len(found), with_face[0])
    left, right = with_face[pos - 1], with_face[pos]
    return np.where(np.arange(len(found)) - left <= right - np.arange(len(found)), left, right)


class NeuralEngine:
    """VideoReTalking's D-Net / E-Net / GPEN / GFPGAN pipeline (PIPELINE.md) on the clip's face track."""

    name = "neural"

    def __init__(self, request: RedubRequest) -> None:
        self.request = request
        self.device = resolve_device(request.device)
        check_precision(self.device, request.precision)
        self._autocast = functools.partial(autocast, self.device, request.precision)
        self._aus = expression_aus(request.upper_face) if request.upper_face != "none" else None
        self._clip: SourceClip | None = None
        self._cache: ArtifactCache | None = None
        self._private_dir: tempfile.TemporaryDirectory | None = None
        self._key = ""
        self._semantic: np.ndarray | None = None
        self._expression: np.ndarray | None = None
        self._mel: np.ndarray | None = None
        self._references: tuple[int, np.ndarray] | None = None  # (chunk index, refs) of the last chunk read

    # --- models and keys ---------------------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> Path:
        return find_checkpoint(name, self.request.checkpoints)

    def _model(self, loader: Callable, *names: str) -> torch.nn.Module:
        paths = tuple(self._checkpoint(n) for n in names)
        return _load(loader, paths, tuple(_identity(p) for p in paths), str(self.device))

    def _expression_identity(self) -> tuple:
        if self.request.expression in EXPRESSION_KEYS:
            return self.request.expression, _identity(self._checkpoint("expression.mat"))
        image = Path(self.request.expression)
        return (
            "image",
            hashlib.sha256(image.read_bytes()).hexdigest(),
            _identity(self._checkpoint(PREPARE_CHECKPOINTS[0])),
        )

    def _prepare_key(self, clip: SourceClip) -> str:
        track = hashlib.sha256()
        for array in (clip.track.boxes, clip.track.landmarks, clip.track.found):
            track.update(np.ascontiguousarray(array).tobytes())
        return cache_key(
            "neural-prepare",
            PREPARE_FORMAT,
            retalk.__version__,
            clip.content_key,
            track.hexdigest(),
            self._expression_identity(),
            self.request.precision,
            *(_identity(self._checkpoint(n)) for n in PREPARE_CHECKPOINTS),
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
        return hits

    def listen(self, wav16k: np.ndarray, rate: Fraction, n_frames: int) -> None:
        self._mel = mel_chunks_for_frames(melspectrogram(wav16k), rate, n_frames)

    def render_chunk(
        self, frames: np.ndarray, source_index: np.ndarray, output_index: np.ndarray
    ) -> np.ndarray:
        """Clip frames ``source_index`` lip-synced as output frames ``output_index``; faceless ones unchanged."""
        if self._clip is None or self._mel is None:
            raise RuntimeError("NeuralEngine.prepare() and listen() must run before render_chunk()")
        track = self._clip.track
        local = np.asarray(source_index) - self._clip.start
        rows = np.flatnonzero(track.found[local])
        out = frames.copy()
        if len(rows) == 0:
            return out
        height, width = frames.shape[1:3]
        boxes = [stages.paste_box(track.boxes[local[k]], width, height) for k in rows]
        lm68 = track.landmarks[local[rows]]
        faces = np.stack(
            [stages.crop_resized(frames[k], b, stages.FACE_SIZE) for k, b in zip(rows, boxes, strict=True)]
        )
        references = np.stack([self._reference(int(local[k])) for k in rows])
        outputs = [int(i) for i in np.asarray(output_index)[rows]]
        enet = self._model(load_enet, "ENet.pth", "LNet.pth")
        gfpgan = self._model(load_gfpgan, "GFPGANv1.3.pth")
        parsenet = self._model(load_parsenet, "ParseNet-latest.pth")

        with torch.inference_mode(), self._autocast():
            # 1. E-Net: the lower half of each face from its mel window and reference
            pred = stages.lip_sync(
                enet,
                self._mel[outputs],
                faces,
                references,
                [self._seed(i, ENET_NOISE) for i in outputs],
                self.device,
            )
            # 2. optional upper-face expression
            if self._aus is not None:
                ganimation = self._model(load_ganimation, "30_net_gen.pth")
                pred = stages.edit_upper_face(ganimation, faces, pred, self._aus, self.device)
            # 3. paste, then GFPGAN on the face aligned from the track's 5 points
            pasted = stages.paste_faces(frames[rows], boxes, pred)
            restored, matrices = stages.restore_faces(
                gfpgan, pasted, lm68, [self._seed(i, GFPGAN_NOISE) for i in outputs], self.device
            )
            # 4. blends on the region around each face
            regions = [stages.work_region(b, width, height) for b in boxes]
            origins = [(r[0], r[1]) for r in regions]
            local_boxes = [
                (x1 - rx, y1 - ry, x2 - rx, y2 - ry)
                for (x1, y1, x2, y2), (rx, ry) in zip(boxes, origins, strict=True)
            ]
            pasted_regions = [p[y1:y2, x1:x2] for p, (x1, y1, x2, y2) in zip(pasted, regions, strict=True)]
            restored_regions = [
                stages.paste_back_restored(p, r, m, o)
                for p, r, m, o in zip(pasted_regions, restored, matrices, origins, strict=True)
            ]
            mouths = stages.box_mouth_mask(parsenet, restored_regions, local_boxes, self.device)
            mouth_blended = [
                stages.blend_mouth(r, p, m)
                for r, p, m in zip(restored_regions, pasted_regions, mouths, strict=True)
            ]
            final = stages.face_parse_blend(
                parsenet, mouth_blended, frames[rows], lm68, regions, local_boxes, self.device
            )
        for k, (x1, y1, x2, y2), face in zip(rows, regions, final, strict=True):
            out[k, y1:y2, x1:x2] = face
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

    def _crops(
        self, frames: np.ndarray, local: np.ndarray
    ) -> tuple[list[tuple[int, int, int, int]], np.ndarray, np.ndarray]:
        """Head boxes, 256 crops and the track's landmarks in them for clip frames ``local``."""
        track = self._clip.track
        height, width = frames.shape[1:3]
        heads = [stages.head_box(track.landmarks[i], width, height) for i in local]
        crops = np.stack(
            [stages.crop_resized(f, h, stages.CROP_SIZE) for f, h in zip(frames, heads, strict=True)]
        )
        lm256 = np.stack(
            [
                stages.landmarks_in_box(track.landmarks[i], h, stages.CROP_SIZE)
                for i, h in zip(local, heads, strict=True)
            ]
        )
        return heads, crops, lm256

    def _coefficients(self, clip: SourceClip, report: Callable[[str, int, int], None]) -> np.ndarray:
        face3d = self._model(load_face3d, "face3d_pretrain_epoch_20.pth")
        found = clip.track.found
        semantic = np.zeros((len(found), 262), np.float32)
        with torch.inference_mode(), self._autocast():
            for chunk in media.iter_frames(clip.path, clip.start, clip.end, chunk_size=PREP_CHUNK):
                local = chunk.start - clip.start + np.arange(len(chunk.frames))
                keep = found[local]
                if keep.any():
                    _, crops, lm256 = self._crops(chunk.frames[keep], local[keep])
                    semantic[local[keep]] = stages.face3d_rows(face3d, crops, lm256, self.device)
                report("coefficients", int(local[-1]) + 1, len(found))
        return semantic[_nearest_found(found)]  # faceless frames borrow a neighbour's row for D-Net's window

    def _template(self) -> np.ndarray:
        """The 64 expression coefficients every reference face is re-rendered with (§5)."""
        if self._expression is not None:
            return self._expression
        if self.request.expression in EXPRESSION_KEYS:
            path = self._checkpoint("expression.mat")
            try:
                self._expression = scipy.io.loadmat(str(path))[EXPRESSION_KEYS[self.request.expression]][0]
            except (OSError, ValueError, KeyError) as err:
                raise CheckpointError(
                    f"{path}: not a readable expression.mat ({err}); fetch it again"
                ) from err
            self._expression = self._expression.astype(np.float32)
            return self._expression
        image = np.asarray(Image.open(self.request.expression).convert("RGB"))
        track = track_faces([image])
        if not track.found[0]:
            raise InputError(f"--expression {self.request.expression}: no face found in the image")
        face3d = self._model(load_face3d, "face3d_pretrain_epoch_20.pth")
        with torch.inference_mode(), self._autocast():
            self._expression = stages.expression_from_image(face3d, image, track.landmarks[0], self.device)
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
        references = np.zeros((b - a, stages.FACE_SIZE, stages.FACE_SIZE, 3), np.uint8)
        if keep.any():
            dnet = self._model(load_dnet, "DNet.pt")
            gpen = self._model(load_gpen, "GPEN-BFR-512.pth")
            parsenet = self._model(load_parsenet, "ParseNet-latest.pth")
            height, width = frames.shape[1:3]
            heads, crops, lm256 = self._crops(frames[keep], local[keep])
            box256 = np.stack(
                [
                    stages.landmarks_in_box(clip.track.boxes[i].reshape(2, 2), h, stages.CROP_SIZE).reshape(4)
                    for i, h in zip(local[keep], heads, strict=True)
                ]
            )
            with torch.inference_mode(), self._autocast():
                stabilized = stages.stabilize(
                    dnet, crops, self._semantic, local[keep], self._template(), self.device
                )
                enhanced = stages.enhance_references(gpen, parsenet, stabilized, lm256, box256, self.device)
            for i, head, face in zip(local[keep], heads, enhanced, strict=True):
                box = stages.paste_box(clip.track.boxes[i], width, height)
                references[i - a] = stages.reference_crop(
                    frames[i - a], clip.track.landmarks[i], head, face, box
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
