"""The render farm's cases on a real Ray cluster: a head and two worker nodes with one fake GPU each (engines on
the CPU), in a network namespace with only loopback. tests/test_farm.py runs this file there (`pytest -m ray`);
run directly, outside such a namespace, every case skips.

Each job's output is compared with the one-process render of the same request: frames and audio bit for bit
(lossless codec), rendered by `retalk redub` in a process of its own. The cases share one cluster, one state
folder (whose stage cache the first face1 job fills) and one pool, whose workers start once; the last two cases
close it (`free_nodes`): the neural case starts fresh workers (two workers' networks are most of the memory
these cases use) and the restart case runs servers with pools of their own.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from farm_support import add_node, drive, in_private_network, job_spec, kill_node, ray_start, start_cluster
from mediagen import write_face_clip, write_tone
from server_support import ServerProcess, wait_for

from retalk import media
from retalk.checkpoints import CHECKPOINTS

pytestmark = pytest.mark.skipif(
    not in_private_network(), reason="runs inside the private network namespace tests/test_farm.py makes"
)
ray = pytest.importorskip("ray", reason="the render farm needs Ray: pip install -e '.[ray]'")
from retalk_server.ray_pool import RayPool  # noqa: E402  (needs Ray)

FRAMES = 48  # of face1 (2.2 s): segments of 32 and 16 frames, or three of 16
TIMEOUT = 900.0  # seconds a job may take on a loaded 2-core machine
RETALK = [
    sys.executable,
    "-m",
    "retalk",
]  # commands run in processes of their own: what they load leaves with them


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # nodes inherit the environment they start in: checkpoints (written when a case needs them) and a user
    # cache of their own
    os.environ["RETALK_CHECKPOINTS"] = str(tmp_path_factory.mktemp("checkpoints"))
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    cluster, _ = start_cluster(2)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def nodes(cluster):
    """The cluster's worker nodes, two again if a case killed one."""
    workers = [n for n in cluster.worker_nodes]
    while len(workers) < 2:
        workers.append(add_node(cluster))
    cluster.wait_for_nodes()
    return workers


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    """The farm's state folder (its stage cache: state/cache), as on the share of a real farm."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def farm_pool(cluster, state):
    pool = RayPool(cluster.address, state_dir=state, device="cpu")
    yield pool
    pool.close()


@pytest.fixture
def free_nodes(farm_pool, nodes):
    """The nodes, their fake GPUs free: the shared pool closed (the cases after this one make pools of their own)."""
    farm_pool.close()
    return nodes


def settled(pool: RayPool, workers: int) -> bool:
    """Whether ``pool`` has exactly ``workers`` workers, each ready and idle (it polls once)."""
    pool.poll()
    described = pool.describe()
    return len(described) == workers and all(w["ready"] and w["job"] is None for w in described)


@pytest.fixture
def pool(farm_pool, nodes):
    """The shared pool, settled: an idle worker on each node (a killed node's replacement included)."""
    wait_for(lambda: settled(farm_pool, len(nodes)), 300, f"an idle worker on each of {len(nodes)} nodes")
    return farm_pool


@pytest.fixture(scope="module")
def inputs(media_dir, tmp_path_factory):
    """A media root holding face1 and the speech line, and their one-process lossless render (FRAMES frames,
    with a stage cache of its own: the farm tracks the clip itself)."""
    root = tmp_path_factory.mktemp("media")
    for name in ("face1.mp4", "speech1.wav"):
        shutil.copy(media_dir / name, root / name)
    reference = root.parent / "reference.mkv"
    command = [*RETALK, "redub", "--video", str(root / "face1.mp4"), "--audio", str(root / "speech1.wav")]
    command += ["-o", str(reference), "--end", str(FRAMES), "--engine", "preview", "--codec", "lossless"]
    subprocess.run(
        [*command, "--cache-dir", str(root.parent / "reference-cache")], check=True, capture_output=True
    )
    return root, reference


def decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    frames = np.concatenate([chunk.frames for chunk in media.iter_frames(path)])
    return frames, media.read_audio(path, sample_rate=48000)


def assert_same_render(path: Path, reference: Path) -> None:
    (frames, audio), (expected_frames, expected_audio) = decoded(path), decoded(reference)
    assert frames.shape == expected_frames.shape and np.array_equal(frames, expected_frames), "frames differ"
    assert audio.shape == expected_audio.shape and np.array_equal(audio, expected_audio), "audio differs"


def face1_job(root: Path, output: Path):
    """FRAMES frames of face1 with the speech line, lossless, preview engine."""
    return job_spec(root / "face1.mp4", root / "speech1.wav", output, end=FRAMES)


def busy(pool: RayPool) -> list[dict]:
    """Workers rendering a segment now."""
    return [w for w in pool.describe() if w["segment"] and w["progress"] and w["progress"][0] == "render"]


def test_every_node_is_on_loopback_in_a_namespace_with_no_other_interface(cluster):
    assert in_private_network()
    ray.init(address=cluster.address)
    try:
        addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    finally:
        ray.shutdown()
    assert addresses == {"127.0.0.1"} and cluster.address.startswith("127.0.0.1:")


def test_a_split_preview_job_across_two_nodes_equals_the_one_process_render(pool, inputs, tmp_path):
    root, reference = inputs
    pool.segment_frames = 16  # three segments: one node renders two
    nodes_rendering, progress = set(), []

    def watch(pool, events):
        nodes_rendering.update(w["node"] for w in pool.describe() if w["segment"])
        progress.extend(e.data for e in events if e.kind == "progress" and e.data["stage"] == "render")

    output = tmp_path / "job" / "out.mkv"
    _, final = drive(pool, "split", face1_job(root, output), timeout=TIMEOUT, on_poll=watch)
    assert final.kind == "done", final.data
    assert final.data["frames"] == FRAMES
    assert_same_render(output, reference)
    assert len(nodes_rendering) == 2, f"segments ran on {nodes_rendering}"
    # PROGRESS sums the segments: one total, never going back
    assert {p["total"] for p in progress} == {FRAMES}
    done = [p["done"] for p in progress]
    assert done == sorted(done) and done[-1] >= FRAMES - 16
    assert not output.with_name("out.mkv.segments").exists()  # segments removed once joined


def test_a_segment_of_a_killed_node_runs_again_elsewhere_and_the_job_completes_once(
    pool, cluster, nodes, inputs, tmp_path, caplog
):
    root, reference = inputs
    pool.segment_frames = 32  # two chunks in the first segment: a kill can land between them
    killed = []

    def kill_mid_segment(pool, events):
        if killed:
            return
        for worker in busy(pool):
            if 0 < worker["progress"][1] < worker["progress"][2]:
                node = next(n for n in nodes if n.node_id[:8] in worker["node"])
                kill_node(cluster, node)
                killed.append(worker)
                return

    caplog.set_level(logging.WARNING, logger="retalk.server.farm")
    output = tmp_path / "job" / "out.mkv"
    seen, final = drive(pool, "kill", face1_job(root, output), timeout=TIMEOUT, on_poll=kill_mid_segment)
    assert killed, "no segment was caught half-way"
    a, b = killed[0]["segment"]
    assert final.kind == "done", final.data
    assert f"segment [{a}, {b}) failed (the worker on" in caplog.text and "running it again" in caplog.text
    assert [e.kind for e in seen if e.kind != "progress"] == ["done"]
    time.sleep(1.0)
    assert [e for e in pool.poll() if e.job == "kill"] == []  # nothing more: the job ended once
    assert_same_render(output, reference)


def test_cancel_stops_every_segment(pool, inputs, tmp_path, caplog):
    root, _ = inputs
    pool.segment_frames = 32
    running = []

    def cancel_when_both_render(pool, events):
        """Cancel while both segments run and each has a chunk left (a chunk takes far longer than a cancel)."""
        segments = [w for w in pool.describe() if w["segment"]]
        unfinished = [w for w in segments if w["progress"] is None or w["progress"][1] < w["progress"][2]]
        if not running and len(segments) == 2 and len(unfinished) == 2:
            running.extend(w["segment"] for w in segments)
            pool.cancel("cancel")

    caplog.set_level(logging.INFO, logger="retalk.server.farm")
    output = tmp_path / "job" / "out.mkv"
    _, final = drive(
        pool, "cancel", face1_job(root, output), timeout=TIMEOUT, on_poll=cancel_when_both_render
    )
    assert running, "the two workers never rendered at the same time"
    assert final.kind == "cancelled"  # reported once both segments stopped
    assert all(w["job"] is None for w in pool.describe())
    for a, b in running:  # neither segment was finished
        assert f"segment [{a}, {b}) stopped (cancelled) after the job was cancelled" in caplog.text
    assert not output.exists() and not output.with_name("out.mkv.segments").exists()


def test_a_node_that_cannot_see_the_media_gives_the_clear_error(pool, cluster, inputs, tmp_path):
    root, _ = inputs
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # the pool's connection to the cluster
    log = tmp_path / "hidden-node.log"
    node = ray_start(cluster.address, "--num-gpus", "1", "--num-cpus", "1", mount_over=root, log=log)
    try:
        pool.segment_frames = 32
        wait_for(lambda: settled(pool, 3), 300, "a worker on the third node")
        hidden = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
        assert len(hidden) == 1, log.read_text()[-2000:]
        _, final = drive(pool, "hidden", face1_job(root, tmp_path / "job" / "out.mkv"), timeout=TIMEOUT)
        assert final.kind == "failed" and final.data["code"] == "media", final.data
        message = final.data["message"]
        assert f"{hidden.pop()[:8]}) cannot read the job's video {root / 'face1.mp4'}" in message
        assert "every node mounts at the same path (README: Render farm)" in message
    finally:
        node.terminate()
        node.wait(timeout=60)


def test_a_split_neural_job_across_two_nodes_equals_the_one_process_render(
    free_nodes, cluster, state, tmp_path
):
    """Two small frames in segments of one (synthetic checkpoints are slow on a CPU). The one-process render fills
    the stage cache the farm uses, as a first take would: the farm's prepare step finds the track and references
    there, and each node renders its frame with the same number of threads."""
    required = [name for name, spec in CHECKPOINTS.items() if spec.required]  # the neural engine's own files
    subprocess.run(
        [*RETALK, "models", "synth", os.environ["RETALK_CHECKPOINTS"], *required],
        check=True,
        capture_output=True,
    )
    clip = write_face_clip(tmp_path / "clip.mkv", n_frames=2, size=(160, 120), codec="lossless")
    line = write_tone(tmp_path / "line.wav", 2 / 25)
    reference = tmp_path / "reference.mkv"
    command = [*RETALK, "redub", "--video", str(clip), "--audio", str(line)]
    command += ["-o", str(reference), "--engine", "neural", "--codec", "lossless", "--device", "cpu"]
    command += ["--backend", "torch"]  # the split is under test; tests/test_backends.py covers OpenVINO
    # on a CPU the sums inside a network depend on its thread count: one, as on the one-CPU nodes
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [*command, "--cache-dir", str(state / "cache")], check=True, capture_output=True, env=one_thread
    )

    pool = RayPool(cluster.address, state_dir=state, device="cpu", segment_frames=1)
    try:
        nodes_rendering = set()
        spec = job_spec(clip, line, tmp_path / "job" / "out.mkv", engine="neural", backend="torch")
        _, final = drive(
            pool,
            "neural",
            spec,
            timeout=TIMEOUT,
            on_poll=lambda pool, _: nodes_rendering.update(
                w["node"] for w in pool.describe() if w["segment"]
            ),
        )
    finally:
        pool.close()
    assert final.kind == "done", final.data
    assert final.data["engine"] == "neural"
    assert_same_render(spec.output, reference)
    assert len(nodes_rendering) == 2, f"segments ran on {nodes_rendering}"


class ServerKilled(Exception):
    pass


def test_a_server_restarted_mid_job_resumes_from_its_journal(free_nodes, cluster, inputs, state):
    from retalk_protocol.client import Client

    root, reference = inputs
    # six segments, three rounds of the two workers: the render stage reports frames done while segments are
    # still to come (a preview segment takes a fraction of a second; the progress is polled)
    args = ("--ray", cluster.address, "--segment-frames", "8", "--device", "cpu")
    server = ServerProcess(state, root, *args)
    try:
        with Client(server.endpoint, name="farm", timeout=120) as client:
            job = client.submit(
                "face1.mp4", "speech1.wav", end=FRAMES, engine="preview", options={"codec": "lossless"}
            )

            def kill_while_rendering(event):
                if event.get("stage") == "render" and 0 < event["done"] < FRAMES:
                    server.kill()  # SIGKILL mid-job: the journal and the segments rendered so far survive
                    raise ServerKilled

            with pytest.raises(ServerKilled):
                client.follow(job, timeout=TIMEOUT, on_progress=kill_while_rendering)
    finally:
        server.kill()
    restarted = ServerProcess(state, root, *args)
    try:
        with Client(restarted.endpoint, name="farm", timeout=120) as client:
            workers = client.status()["workers"]
            final = client.follow(job, timeout=TIMEOUT)
        assert len({w["node"] for w in workers}) == 2, workers  # STATUS: the workers, node by node
        assert final["state"] == "done", final
        assert final["attempt"] == 1  # a run cut short by the crash is not counted (§8.2)
        # the cut run's segments were cleared before the job ran again; the done job's folder holds its result
        # and nothing else (§8.3)
        assert sorted(p.name for p in (state / "jobs" / job).iterdir()) == ["result.mkv"]
        assert_same_render(state / "jobs" / job / "result.mkv", reference)
    finally:
        restarted.stop()
