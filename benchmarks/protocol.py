"""RTP/1 throughput: 1080p RGB frames per second through RENDER over tcp and ipc loopback, and the protocol's
share of a job's wall time. Not a test. Usage: python benchmarks/protocol.py [--frames 24]

For each transport it starts `retalk serve`, re-dubs a 1080p sample clip with the preview engine (lossless),
then RENDERs the result in each pixel format. Decoding the result file alone is timed as the floor RENDER
cannot beat; what RENDER costs above it is the protocol's (conversion, framing, transport, client).
First, the transport ceiling: credit-gated FRAME messages through the codec and sockets alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import zmq
from retalk_protocol import codec
from retalk_protocol.client import Client

from retalk import media
from retalk.pipeline.sample import sample_frames, write_sample_speech


def make_inputs(folder: Path, n_frames: int) -> None:
    frames = sample_frames(n_frames, size=(1920, 1080))
    with media.VideoWriter(
        folder / "clip.mkv", width=1920, height=1080, rate=Fraction(25), codec="lossless"
    ) as out:
        out.write(frames)
    write_sample_speech(folder / "speech.wav")


def start_server(endpoint: str, folder: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "retalk", "serve", "--bind", endpoint, "--media-root", str(folder)]
    command += ["--state-dir", str(folder / f"state-{endpoint.split(':')[0]}")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    return process, line.split("listening on ", 1)[1].strip()


def bench(endpoint: str, folder: Path, n_frames: int) -> None:
    process, bound = start_server(endpoint, folder)
    try:
        with Client(bound, name="bench", timeout=600) as client:
            started = time.perf_counter()
            job = client.submit("clip.mkv", "speech.wav", engine="preview", options={"codec": "lossless"})
            final = client.follow(job)
            job_seconds = time.perf_counter() - started
            assert final["state"] == "done", final
            result = folder / f"state-{endpoint.split(':')[0]}" / "jobs" / job / "result.mkv"
            started = time.perf_counter()
            decoded = sum(len(chunk.frames) for chunk in media.iter_frames(result, chunk_size=4))
            decode_seconds = time.perf_counter() - started
            print(
                f"{endpoint.split(':')[0]}: job {job_seconds:.2f} s for {n_frames} frames at 1080p (preview)"
            )
            print(f"  decode only: {decoded / decode_seconds:.1f} fps")
            for pixel_format in ("rgb8", "rgb16", "rgba-half"):
                started = time.perf_counter()
                count = nbytes = 0
                for message in client.render(job, format=pixel_format, audio=False, credit=16):
                    if message.type == "FRAME":
                        count += 1
                        nbytes += len(message.payloads[0])
                seconds = time.perf_counter() - started
                overhead = max(seconds - decode_seconds, 0.0)
                print(
                    f"  RENDER {pixel_format:9s}: {count / seconds:6.1f} fps, {nbytes / seconds / 1e6:7.1f} MB/s;"
                    f" protocol {overhead:.2f} s = {100 * overhead / (job_seconds + seconds):.1f}% of job + render"
                )
    finally:
        process.terminate()
        process.wait()


def transport_ceiling(endpoint: str, n_frames: int = 120, window: int = 16) -> None:
    """FRAME messages of one 1080p rgb8 frame, credit-gated, through the codec and sockets only (no decode)."""
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    bound = router.getsockopt_string(zmq.LAST_ENDPOINT)
    pixels = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)

    def serve() -> None:
        identity, _ = router.recv_multipart()
        credit, sent = window, 0
        while sent < n_frames:
            while credit and sent < n_frames:
                frame = codec.encode(
                    "FRAME",
                    0,
                    [pixels],
                    stream="s",
                    index=sent,
                    time=[sent, 25],
                    width=1920,
                    height=1080,
                    format="rgb8",
                )
                router.send_multipart([identity, *frame], copy=False)
                credit, sent = credit - 1, sent + 1
            if sent < n_frames:
                credit += codec.decode(router.recv_multipart()[1:])["credit"]

    thread = threading.Thread(target=serve)
    thread.start()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(bound)
    started = time.perf_counter()
    dealer.send_multipart(codec.encode("RENDER", 1, job="x"))
    consumed = 0
    for _ in range(n_frames):
        message = codec.decode(dealer.recv_multipart(copy=False))
        assert len(message.payloads[0].buffer) == pixels.nbytes
        consumed += 1
        if consumed * 2 >= window:
            dealer.send_multipart(codec.encode("CREDIT", 0, stream="s", credit=consumed))
            consumed = 0
    seconds = time.perf_counter() - started
    thread.join()
    dealer.close()
    router.close()
    print(
        f"{endpoint.split(':')[0]} transport ceiling: {n_frames / seconds:.1f} fps of 1080p rgb8 "
        f"({n_frames * pixels.nbytes / seconds / 1e9:.2f} GB/s), window {window}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        transport_ceiling("tcp://127.0.0.1:0")
        transport_ceiling(f"ipc://{folder}/ceiling.sock")
        make_inputs(folder, args.frames)
        bench("tcp://127.0.0.1:0", folder, args.frames)
        bench(f"ipc://{folder}/retalk.sock", folder, args.frames)


if __name__ == "__main__":
    main()
