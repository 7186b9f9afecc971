"""Shared fixtures: a local Ray, a tiny untrained zoo card, a small synthetic input folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "backbone_channels": [8, 16, 16, 16],
    "fpn_channels": 16,
    "representation_size": 32,
    "mask_head_channels": [16],
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 100,
    "box_detections_per_img": 20,
}


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the session (2 CPUs, no dashboard)."""
    import logging

    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_card(folder: Path, name: str = "tiny-maskrcnn", params: dict | None = None, seed: int = 0) -> Path:
    """Write an untrained tiny Mask R-CNN zoo entry (weights + card) under ``folder``."""
    import torch

    from segpipe.config import MaskRCNNParams
    from segpipe.data.synthetic import CATEGORIES
    from segpipe.modeling.maskrcnn import build_network
    from segpipe.modeling.zoo import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    p = MaskRCNNParams.model_validate(params or TINY_PARAMS)
    net = build_network(params=p, num_classes=len(CATEGORIES))
    digest = save_weights(net, folder / "weights.safetensors")
    card = {
        "name": name,
        "family": "detection",
        "paper": "Mask R-CNN (test fixture, untrained)",
        "builder": "maskrcnn",
        "params": p.model_dump(mode="json"),
        "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES],
        "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"},
    }
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder / "card.yaml"


TINY_POLAR_PARAMS = {"backbone_channels": [8, 16, 16, 16], "fpn_channels": 16, "tower_convs": 1, "n_rays": 12,
                     "levels": [0, 1, 2], "size_ranges": [16.0, 32.0], "detections_per_img": 30}


def make_polar_card(folder: Path, name: str = "tiny-polarmask", categories: list[dict] | None = None, seed: int = 0) -> Path:
    """Write an untrained tiny PolarMask zoo entry (default: the shapes categories)."""
    import torch

    from segpipe.config import PolarMaskParams
    from segpipe.data.synthetic import CATEGORIES
    from segpipe.modeling.polarmask import build_network
    from segpipe.modeling.zoo import save_weights

    cats = categories or [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    p = PolarMaskParams.model_validate(TINY_POLAR_PARAMS)
    digest = save_weights(build_network(params=p, num_classes=len(cats)), folder / "weights.safetensors")
    card = {"name": name, "family": "single-shot polar", "paper": "PolarMask (test fixture, untrained)", "builder": "polarmask",
            "params": p.model_dump(mode="json"), "categories": cats,
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder / "card.yaml"


TINY_EMBED_PARAMS = {"channels": [4, 8, 8], "full_res_channels": 2, "context_dilations": [2],
                     "fg_thresh": 0.05, "min_pixels": 4, "max_instances": 50}
TINY_POINTREND_PARAMS = {"channels": [4, 8], "full_res_channels": 2, "context_dilations": [], "feat_channels": 4, "hidden": 8,
                         "train_points": 32, "max_train_instances": 4, "output_size": 56, "points": 64}
TINY_RSIS_PARAMS = {"channels": [4, 8, 8], "full_res_channels": 2, "context_dilations": [2], "lstm_channels": [8, 4],
                    "max_steps": 6, "min_pixels": 2}


def make_embed_card(folder: Path, method: str, name: str | None = None, categories: list[dict] | None = None, seed: int = 0,
                    params: dict | None = None) -> Path:
    """Write an untrained tiny SpatialEmbeddings (``method='spatialemb'``) or discriminative-loss
    (``'discloss'``) zoo entry. Low foreground thresholds make untrained weights still emit instances."""
    import torch

    from segpipe.data.synthetic import CATEGORIES
    from segpipe.modeling.zoo import save_weights
    from segpipe.train.methods import METHODS

    spec = METHODS[method]
    cats = categories or [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    extra = {"seed_thresh": 0.05} if method == "spatialemb" else {}
    p = spec.params.model_validate(TINY_EMBED_PARAMS | extra | (params or {}))
    digest = save_weights(spec.build(params=p, num_classes=len(cats)), folder / "weights.safetensors")
    card = {"name": name or f"tiny-{method}", "family": spec.family, "paper": f"{method} (test fixture, untrained)",
            "builder": spec.builder, "params": p.model_dump(mode="json"), "categories": cats,
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder / "card.yaml"


@pytest.fixture(scope="session")
def tiny_card(tmp_path_factory) -> Path:
    return make_card(tmp_path_factory.mktemp("zoo") / "tiny-maskrcnn")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """6 synthetic images + annotations.json, and two bad files in images/."""
    from segpipe.data.synthetic import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_dataset(SynthSpec(n=6, seed=77), root)
    good = sorted((root / "images").glob("*.jpg"))[0].read_bytes()
    (root / "images" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "images" / "notes.png").write_bytes(b"<html><body>not an image</body></html>")
    return root


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory):
    """One ``segpipe demo --n 8`` for the session (maskrcnn-shapes + spatialemb-shapes fused,
    refined by pointrend-shapes, scored against the generated ground truth) -> an object with
    ``output`` (the command's output), ``exit_code``, ``root`` (the demo folder), ``run`` (the
    run's output folder) and ``gt`` (annotations.json)."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from segpipe.cli import app

    root = tmp_path_factory.mktemp("demo") / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(root), "--n", "8"], catch_exceptions=False)
    runs = sorted((root / "runs").glob("*")) if (root / "runs").is_dir() else []
    return SimpleNamespace(output=r.output, exit_code=r.exit_code, root=root, run=runs[-1] if runs else None,
                           gt=root / "data" / "annotations.json")


def assert_training_reduces_loss(net, images, targets, steps: int = 30, lr: float = 1e-2, factor: float = 0.7) -> None:
    """A few Adam steps on one fixed batch must bring the summed loss below ``factor`` x its start."""
    import torch

    opt = torch.optim.Adam(net.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = sum(net(images, targets).values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < factor * first, (float(loss.detach()), first)


def check_loss_backward(net, images, targets, keys: set[str]) -> list:
    """Training forward: exactly the loss ``keys``, a finite total, a backward pass; returns each
    parameter's gradient (None where the loss does not reach it); the gradients present are finite."""
    import torch

    losses = net(images, targets)
    assert set(losses) == keys
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    return grads


def check_nonoverlapping_output(adapter, label_ids: set[int], min_area: int = 1) -> list:
    """Run ``adapter`` on two random images and check the Instances contract of the methods whose
    instances never overlap: sizes, at least one instance, labels among ``label_ids``, scores in
    descending order, disjoint masks of at least ``min_area`` pixels, tight boxes, float16 box-frame
    soft masks in [0, 1]. Returns the Instances."""
    import numpy as np

    from segpipe.ops import masks as mask_ops

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (45, 61, 3), dtype=np.uint8), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)]
    out = adapter.predict(images)
    assert [(i.height, i.width) for i in out] == [(45, 61), (32, 32)]
    assert sum(len(i) for i in out) > 0
    for inst in out:
        assert set(np.unique(inst.labels)) <= label_ids
        assert np.all(np.diff(inst.scores) <= 0)
        if len(inst):
            assert mask_ops.decode(inst.masks).sum(0).max() <= 1  # never overlap
            assert np.all(mask_ops.area(inst.masks) >= min_area)
            xywh = mask_ops.to_bbox(inst.masks)
            np.testing.assert_allclose(inst.boxes[:, :2], xywh[:, :2])
            np.testing.assert_allclose(inst.boxes[:, 2:], xywh[:, :2] + xywh[:, 2:])
            assert inst.mask_probs.shape == (len(inst), 28, 28) and inst.mask_probs.dtype == np.float16
            assert float(inst.mask_probs.max()) <= 1.0 and float(inst.mask_probs.min()) >= 0.0
    return out


def make_pointrend_card(folder: Path, name: str = "tiny-pointrend", seed: int = 0) -> Path:
    """Write an untrained tiny refiner zoo entry (builder pointrend)."""
    import torch

    from segpipe.config import PointRendParams
    from segpipe.modeling.zoo import save_weights
    from segpipe.refine.pointrend import PointRendRefiner

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    p = PointRendParams.model_validate(TINY_POINTREND_PARAMS)
    digest = save_weights(PointRendRefiner(p), folder / "weights.safetensors")
    card = {"name": name, "family": "refinement", "paper": "PointRend (test fixture, untrained)", "builder": "pointrend",
            "params": p.model_dump(mode="json"), "categories": [{"id": 1, "name": "any"}],
            "weights": {"file": "weights.safetensors", "sha256": digest, "format": "safetensors", "dtype": "float16"}}
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder / "card.yaml"


# --- S3: moto's HTTP server on loopback -------------------------------------------------------

# Secret-looking credentials: moto accepts any; tests assert they never reach outputs or logs.
S3_KEY_ID = "AKIASEGPIPETESTKEY01"
S3_SECRET = "sEgPiPe/Secret+Value/DoNotLeak0123456789xyz"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server as a separate process on 127.0.0.1; yields its endpoint URL."""
    import shutil
    import subprocess
    import time
    import urllib.request

    exe = shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: pip install 'moto[server]'")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def stop_node(proc) -> None:
    """Stop a ``ray start --block`` started in its own session: SIGTERM to its process group, then
    SIGKILL to the group after 3 s. Ray's graceful stop of a node takes about 33 s here; the group
    holds the node's raylet, GCS, agents and workers, so killing it leaves no Ray process behind."""
    import os
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(timeout=3 if sig == signal.SIGTERM else 30)
        except subprocess.TimeoutExpired:
            pass


def node_ports() -> list[str]:
    """``ray start`` options giving a node its own free agent, metrics and manager ports, so it
    can run beside the tests' embedded Ray (whose dashboard agent holds the default 52365). The
    worker port range lies in 20000-29999, below the kernel's ephemeral range that the other
    (free, ephemeral) ports come from, so the two never overlap."""
    import random
    import socket

    while True:
        w = 20000 + 200 * random.randrange(50)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", w))
                break
            except OSError:
                continue
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--min-worker-port={w}", f"--max-worker-port={w + 200}"]


def s3_env(endpoint: str | None = None) -> dict:
    """A process environment with the test credentials (and ``AWS_ENDPOINT_URL`` when given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def s3_fs(endpoint: str):
    """An s3fs filesystem on the test server, with the test credentials passed explicitly."""
    import s3fs

    return s3fs.S3FileSystem(key=S3_KEY_ID, secret=S3_SECRET, client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


# --- runs in a subprocess ----------------------------------------------------------------------


def committed_shards(out: Path) -> int:
    """How many shard commit markers a local run output holds."""
    d = out / "_segpipe" / "shards"
    return len(list(d.glob("shard-*.json"))) if d.is_dir() else 0


def wait_for_commits(proc, out: Path, n: int, timeout: float = 300) -> None:
    """Poll until ``n`` shards of ``out`` are committed; fail if ``proc`` ends first or on timeout."""
    import time

    t0 = time.time()
    while committed_shards(out) < n:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {n} shards were committed")
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {n} commits")
        time.sleep(0.02)


def assert_sound(label: str, run_uri: str, fs=None) -> dict:
    """Audit a run output (segpipe.provenance.audit) and print one line of counts for the record
    (``pytest -s`` shows them); fail unless nothing is lost, duplicated or extra."""
    from segpipe.provenance.audit import audit_run, sound

    a = audit_run(run_uri, fs)
    print(f"\nAUDIT {label}: inputs {a['inputs']}, images {a['images']} ({a['ok']} ok), errors {a['errors']}, "
          f"instances {a['instances']}, duplicates {a['duplicates']}, lost {a['lost']}, extra {a['extra']}")
    assert sound(a), a
    return a


NUCLEI_SAMPLE = REPO / "workflows" / "samples" / "nuclei"


def mini_nuclei(tmp_path: Path, n_train: int = 3, n_val: int = 2) -> Path:
    """A nuclei-layout folder (train.json, val.json, images/) made from the bundled sample."""
    sample = json.loads((NUCLEI_SAMPLE / "annotations.json").read_text())
    ims = sorted(sample["images"], key=lambda im: im["width"] * im["height"])
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    for split, chosen in (("train", ims[:n_train]), ("val", ims[n_train : n_train + n_val])):
        ids = {im["id"] for im in chosen}
        data = {"images": chosen, "annotations": [a for a in sample["annotations"] if a["image_id"] in ids],
                "categories": sample["categories"]}
        (root / f"{split}.json").write_text(json.dumps(data))
        for im in chosen:
            shutil.copy(NUCLEI_SAMPLE / "images" / im["file_name"], root / "images")
    return root
