"""Cut the compact golden set that ships in retalk/data/golden from the reference's full golden files.

    python tools/make_compact_golden.py GOLDEN_DIR [-o retalk/data/golden]

Nothing is computed anew: every array is the reference's own, cut down. Network files keep batch item 0 of
each input and output (the networks treat batch items independently, and every case runs at any batch size),
some large outputs keep a strided grid of their values (meta["compact"]["select"] records the slices, which
the selftest takes of its own outputs too), and functions.npz keeps one input of each function. Inputs with
few distinct values (images scaled from 8 bits) are stored losslessly as codes into their distinct values.
Each file's meta["compact"] names its source file and sha256; README.md beside the files sums it all up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from retalk.selftest import compact_slices

ROOT = Path(__file__).resolve().parent.parent
EVERY_4TH_PIXEL = [[None, None, None], [None, None, None], [None, None, 4], [None, None, 4]]
# golden file -> output -> slices kept of it (after batch item 0 is taken), one [start, stop, step] per axis
SELECT: dict[str, dict[str, list[list[int | None]]]] = {
    "ENet.npz": {"pred": EVERY_4TH_PIXEL},
    "DNet.npz": {"warp_image": EVERY_4TH_PIXEL, "fake_image": EVERY_4TH_PIXEL},
    "GFPGANv1.3.npz": {"image": EVERY_4TH_PIXEL},
    "GPEN-BFR-512.npz": {"image": EVERY_4TH_PIXEL},
    "ParseNet.npz": {
        "out_mask_sub4": EVERY_4TH_PIXEL,
        "out_mask_window": EVERY_4TH_PIXEL,
        "out_img": EVERY_4TH_PIXEL,
    },
    "S3FD.npz": {
        "cls1": EVERY_4TH_PIXEL,
        "reg1": EVERY_4TH_PIXEL,
        "cls2": EVERY_4TH_PIXEL,
        "reg2": EVERY_4TH_PIXEL,
    },
    "GANimation_gen.npz": {"embed_sub4": EVERY_4TH_PIXEL},
    "functions.npz": {
        "audio.mel_chunks_fps25": [[None, None, 8]],
        "audio.mel_chunks_fps22.131147540983605": [[None, None, 8]],
        "laplacian.real_out_levels10": [[None, None, 4], [None, None, 4]],
        "laplacian.real_out_levels6": [[None, None, 4], [None, None, 4]],
    },
}
# functions.npz: the second input of a function, and what no function reads, stay in the full set only
FUNCTIONS_LEFT_OUT = (
    "audio.raw_int16_first3s",
    "audio.wav16k_full_len",
    "audio.wav16k_first3s_soxr_hq",
    "audio.mel_first3s_from_soxr_hq",
    "laplacian.rand_",
    "align.lm_fan_",
    "align.numpy_version",
    "align.img_b_rgb_u8",
    "align.lm_b",
    "align.trans_params_b",
    "align.im_aligned_b",
    "align.lm_aligned_b",
    "align.lm5p_b",
)


def _encoded(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """A float32 input as codes into its distinct bit patterns when that is smaller; checked to decode exactly."""
    if value.dtype != np.float32 or value.size < 4096:
        return {key: value}
    bits, codes = np.unique(value.view(np.uint32), return_inverse=True)
    if len(bits) > 65536:
        return {key: value}
    codes = codes.reshape(value.shape).astype(np.uint8 if len(bits) <= 256 else np.uint16)
    values = bits.view(np.float32)
    assert values[codes].tobytes() == value.tobytes(), key
    return {f"{key}#codes": codes, f"{key}#values": values}


def compact(source: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The compact arrays of one golden file and the provenance written into its meta."""
    select = SELECT.get(source.name, {})
    arrays: dict[str, np.ndarray] = {}
    with np.load(source, allow_pickle=False) as data:
        is_network = "meta" in data.files
        meta = json.loads(str(data["meta"])) if is_network else {}
        for key in data.files:
            value = data[key]
            if key == "meta" or key.startswith(FUNCTIONS_LEFT_OUT):
                continue
            if value.dtype.kind == "U":  # functions.npz's notes and versions
                arrays[key] = value
                continue
            if is_network:
                value = value[:1]  # batch item 0
            if key.startswith("in."):
                arrays.update(_encoded(key, value))
            else:
                arrays[key] = np.ascontiguousarray(
                    compact_slices(value, select.get(key.removeprefix("out.")))
                )
    provenance = {
        "source": source.name,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "batch_items": [0] if is_network else None,
        "select": select,
        "left_out": [] if is_network else list(FUNCTIONS_LEFT_OUT),
    }
    meta["compact"] = provenance
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays, provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden", type=Path, help="the reference's golden folder (shared/reference/golden)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "retalk" / "data" / "golden")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rows = []
    for source in sorted(args.golden.glob("*.npz")):
        arrays, provenance = compact(source)
        target = args.output / source.name
        np.savez_compressed(target, **arrays)
        rows.append((source.name, source.stat().st_size, target.stat().st_size, provenance["source_sha256"]))
        print(f"{source.name}: {source.stat().st_size / 1e6:.2f} MB -> {target.stat().st_size / 1e6:.2f} MB")
    print(f"total {sum(r[2] for r in rows) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
