"""Bad inputs (issue 7): every file of the corpus (tests/corpus.py) decodes to the right image or
is refused with the right error type, bombs cheaply, and a run over the whole folder accounts for
every input without stopping."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.io.decode import DecodeError, declared_size, decode_image
from segpipe.io.listing import list_source

from conftest import REPO
from corpus import Expect, write_corpus

MAX_PIXELS = 64_000_000  # the workflows' default
PATTERNS = ["*.jpg", "*.jpeg", "*.png", "*.gif", "*.bmp", "*.webp", "*.tif", "*.tiff"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Expect]]:
    root = tmp_path_factory.mktemp("corpus") / "inputs"
    return root, write_corpus(root)


def _decode(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning may leak (palette transparency, bomb warnings)
        return decode_image(path.read_bytes(), max_pixels=MAX_PIXELS)


def _check_image(rel: str, out: np.ndarray, e: Expect) -> list[str]:
    problems = []
    w, h = e.size
    if out.shape != (h, w, 3) or out.dtype != np.uint8:
        return [f"{rel}: got {out.shape} {out.dtype}, want ({h}, {w}, 3) uint8"]
    for x, y, rgb in e.probes:
        got = out[y, x].astype(int)
        if np.abs(got - rgb).max() > e.tol:
            problems.append(f"{rel}: pixel (x={x}, y={y}) is {tuple(got)}, want {rgb} +- {e.tol}")
    if e.grey and not (np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])):
        problems.append(f"{rel}: channels differ for a grey image")
    return problems


# --- the corpus itself -----------------------------------------------------------------------


def test_corpus_files_are_what_they_claim(corpus):
    """Guards the generator: each file really has the format, mode or trait it is named for."""
    root, expect = corpus

    def opened(rel):
        return Image.open(io.BytesIO((root / rel).read_bytes()))  # no file handle left open

    assert (root / "zero_byte.jpg").stat().st_size == 0
    assert opened("jpeg_named.png").format == "JPEG"
    assert opened("gray16.png").mode == "I;16"
    assert opened("cmyk.jpg").mode == "CMYK"
    pal = opened("palette_transparent.png")
    assert pal.mode == "P" and pal.info["transparency"] == bytes([0, 128, 255, 255])
    assert opened("rgba.png").mode == "RGBA"
    assert opened("bilevel_1bit.png").mode == "1"
    assert opened("grayscale.jpg").mode == "L"
    for o in (6, 8):
        im = opened(f"exif_orientation_{o}.jpg")
        assert im.size == (80, 48) and im.getexif()[0x0112] == o
    gif = opened("animated.gif")
    assert gif.format == "GIF" and gif.n_frames == 2
    gif.seek(1)
    assert np.asarray(gif.convert("RGB"))[12, 16].tolist() == [255, 255, 255]  # frame 2 differs from frame 1
    assert [opened(f"image.{x}").format for x in ("bmp", "webp", "tiff")] == ["BMP", "WEBP", "TIFF"]
    assert opened("large_photo.jpg").size == (6000, 4000)
    assert (root / "folder.jpg").is_dir()
    for rel, e in expect.items():
        if e.bomb:
            assert (root / rel).stat().st_size < 200_000, rel  # kilobytes that declare > 100 Mpixels
    # Everything the issue lists is here.
    names = set(expect)
    assert {"truncated.jpg", "random_bytes.png", "html_page.jpg", "png_header_garbage.png", "one_pixel.png",
            "name with spaces.jpg", "ünïcödé 写真.png", "folder.jpg/inside.png"} <= names
    assert sum(e.bomb for e in expect.values()) >= 1


def test_folder_named_like_an_image_is_not_an_input(corpus):
    root, expect = corpus
    rels = [f.relpath for f in list_source(str(root), patterns=PATTERNS)]
    assert sorted(rels) == sorted(expect)
    assert "folder.jpg" not in rels and "folder.jpg/inside.png" in rels


# --- decoding ------------------------------------------------------------------------------------


def test_every_corpus_file_decodes_or_is_refused(corpus):
    root, expect = corpus
    problems = []
    for rel, e in sorted(expect.items()):
        try:
            out = _decode(root / rel)
        except DecodeError as err:
            if e.ok:
                problems.append(f"{rel}: refused ({err.error_type}: {err}), want an image of {e.size}")
            elif err.error_type != e.error_type or not str(err):
                problems.append(f"{rel}: error_type {err.error_type!r} ({err}), want {e.error_type!r}")
            continue
        except Exception as err:  # noqa: BLE001 - a leaked warning or a non-DecodeError is a failure
            problems.append(f"{rel}: raised {type(err).__name__}: {err}")
            continue
        if not e.ok:
            problems.append(f"{rel}: decoded to {out.shape}, want error {e.error_type!r}")
        else:
            problems.extend(_check_image(rel, out, e))
    assert not problems, "\n".join(problems)


def test_exif_rotated_is_in_the_displayed_frame(corpus):
    """Orientation 6 turns the stored image clockwise: stored top-left (red) shows top-right."""
    root, _ = corpus
    out = _decode(root / "exif_orientation_6.jpg")
    assert out.shape == (80, 48, 3)
    assert out[:10, -10:].reshape(-1, 3).mean(0).round().tolist() == pytest.approx([255, 0, 0], abs=30)
    assert out[:10, :10].reshape(-1, 3).mean(0).round().tolist() == pytest.approx([0, 0, 255], abs=30)
    out8 = _decode(root / "exif_orientation_8.jpg")
    assert out8[-10:, :10].reshape(-1, 3).mean(0).round().tolist() == pytest.approx([255, 0, 0], abs=30)


def test_bombs_are_refused_from_the_header_cheaply(corpus):
    """Each bomb is refused fast and without a pixel buffer. tracemalloc sees Python and numpy
    allocations only; test_bombs_allocate_no_pixel_buffer_at_all sees Pillow's and libwebp's."""
    root, expect = corpus
    bombs = sorted(rel for rel, e in expect.items() if e.bomb)
    assert len(bombs) == 4
    for rel in bombs:
        data = (root / rel).read_bytes()
        tracemalloc.start()
        t = time.perf_counter()
        with pytest.raises(DecodeError) as ei:
            decode_image(data, max_pixels=MAX_PIXELS)
        dt = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert ei.value.error_type == "too_large", rel
        assert peak < 50 * 2**20 and dt < 0.5, (rel, peak, dt)
    assert declared_size((root / "bomb.png").read_bytes()) == (30000, 30000)
    assert declared_size((root / "bomb_canvas.webp").read_bytes()) == (12000, 12000)


PEAK_SCRIPT = """
import sys, time
from segpipe.io.decode import DecodeError, decode_image
def vm_peak_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmPeak")) / 1024
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    before, t = vm_peak_mb(), time.perf_counter()
    try:
        decode_image(data, max_pixels=64_000_000)
        kind = "ok"
    except DecodeError as e:
        kind = e.error_type
    print(kind, round(vm_peak_mb() - before, 1), round((time.perf_counter() - t) * 1000, 2))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmPeak is read from /proc (Linux)")
def test_bombs_allocate_no_pixel_buffer_at_all(corpus):
    """Peak virtual memory (which counts calloc'ed but untouched buffers, as libwebp's canvas is)
    does not grow while a bomb is refused; before the header check, the WebP bomb grew it 1.1 GB."""
    root, expect = corpus
    bombs = sorted(rel for rel, e in expect.items() if e.bomb)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *[str(root / r) for r in bombs]],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout.split("\n")
    for rel, line in zip(bombs, out):
        kind, grew_mb, ms = line.split()
        assert kind == "too_large" and float(grew_mb) < 50, (rel, line)


def test_max_pixels_is_the_limit_not_pillows(monkeypatch):
    """Pillow refuses past 2 x its MAX_IMAGE_PIXELS (179 Mpx) inside Image.open; a larger
    max_pixels is honoured (the file then fails for its missing data, not its size)."""
    from corpus import _png_chunk

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", (15000).to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0]))
    with pytest.raises(DecodeError) as ei:
        decode_image(header + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)), max_pixels=300_000_000)
    assert ei.value.error_type != "too_large", ei.value
    with pytest.raises(DecodeError) as ei:
        decode_image(header, max_pixels=224_999_999)
    assert ei.value.error_type == "too_large"


def test_decode_large_photo_time(corpus):
    root, _ = corpus
    t = time.perf_counter()
    out = _decode(root / "large_photo.jpg")
    assert out.shape == (4000, 6000, 3) and out.std() > 20  # photo-like, not flat
    assert time.perf_counter() - t < 5


# --- a model stage keeps going when one image fails ----------------------------------------------


def test_model_stage_turns_a_failing_image_into_an_error_record(tiny_card):
    """The tiny Mask R-CNN predicts on a 1x1 image; an image the adapter rejects (4 channels)
    fails alone, as an error record of stage model:<name>, and the batch's other rows keep
    their predictions; rows already in error are passed through untouched."""
    from segpipe.pipeline.stages import ModelStage
    from segpipe.structures import Instances

    stage = ModelStage(model_ref=str(tiny_card), model_name="tiny-maskrcnn", use_gpu=False, num_threads=1,
                       score_threshold=0.05, keep_image=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), np.full((1, 1, 3), 9, np.uint8),
              np.zeros((16, 16, 4), np.uint8), np.zeros((0, 0, 3), np.uint8)]
    batch = {"uri": np.array(["a", "b", "c", "d"], dtype=object), "image": np.empty(4, dtype=object),
             "error_stage": np.array(["", "", "", "decode"], dtype=object),
             "error_type": np.array(["", "", "", "truncated"], dtype=object),
             "error_message": np.array(["", "", "", "cut short"], dtype=object)}
    batch["image"][:] = images
    out = stage(batch)
    assert "image" not in out
    preds = out["pred:tiny-maskrcnn"]
    assert [(i.height, i.width) for i in map(Instances.from_bytes, preds[:2])] == [(48, 64), (1, 1)]
    assert list(out["error_stage"]) == ["", "", "model:tiny-maskrcnn", "decode"]
    assert out["error_type"][2] and out["error_message"][2] and preds[2] == b""
    assert (out["error_type"][3], out["error_message"][3], preds[3]) == ("truncated", "cut short", b"")


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_over_the_corpus_accounts_for_every_input(ray_local, tiny_card, corpus, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from segpipe.config import load_workflow
    from segpipe.pipeline.run import run_workflow
    from segpipe.sinks.writer import read_committed

    root, expect = corpus
    out = tmp_path / "out"
    sets = [f"source.uri={root}", f"output.uri={out}", f"models.0.model={tiny_card}", "source.shard_size=4",
            f"source.patterns={PATTERNS}", f"decode.max_pixels={MAX_PIXELS}"]
    result = run_workflow(load_workflow(REPO / "workflows" / "shapes.yaml", sets), run_id="corpus", progress=lambda m: None)
    assert result.status == "complete", result.reason

    images = read_committed(str(out), "images").to_pylist()
    errors = read_committed(str(out), "errors").to_pylist()
    by_rel = {r["relpath"]: r for r in images}
    assert len(by_rel) == len(images) and sorted(by_rel) == sorted(expect)  # each input exactly once
    assert "folder.jpg" not in by_rel
    rel_of = {r["uri"]: r["relpath"] for r in images}
    err_by_rel = {rel_of[r["uri"]]: r for r in errors}
    assert len(err_by_rel) == len(errors)
    assert sorted(err_by_rel) == sorted(rel for rel, e in expect.items() if not e.ok)
    for rel, e in expect.items():
        row = by_rel[rel]
        if e.ok:
            assert (row["status"], row["width"], row["height"]) == ("ok", *e.size), rel
        else:
            err = err_by_rel[rel]
            assert (row["status"], row["width"], row["height"]) == ("error", None, None), rel
            assert (err["stage"], err["error_type"]) == (e.stage, e.error_type), (rel, err)
            assert err["message"], rel
    assert result.counts["images"] == len(expect) and result.counts["errors"] == len(errors)
    from conftest import assert_sound

    assert_sound("bad-input corpus", str(out))

    # Masks live in the displayed frame of the EXIF-rotated images. The 1x1 image is predicted
    # (status ok, no model error); its proposals' masks are empty, so the sinks keep none of them.
    inst = read_committed(str(out), "instances").to_pylist()
    assert by_rel["one_pixel.png"]["n_instances"] == sum(r["image_uri"] == by_rel["one_pixel.png"]["uri"] for r in inst)
    for rel, (w, h) in [("exif_orientation_6.jpg", (48, 80)), ("exif_orientation_8.jpg", (48, 80))]:
        rows = [r for r in inst if r["image_uri"] == by_rel[rel]["uri"]]
        assert rows and len(rows) == by_rel[rel]["n_instances"], rel  # the untrained model proposes at 0.05
        for r in rows:
            assert (r["mask_width"], r["mask_height"]) == (w, h)
            rle = {"size": [r["mask_height"], r["mask_width"]], "counts": r["mask_rle"].encode()}
            assert mask_utils.decode(rle).shape == (h, w)
    coco = COCO(str(out / "coco" / "instances.json"))
    exif = coco.imgs[by_rel["exif_orientation_6.jpg"]["image_id"]]
    assert (exif["width"], exif["height"]) == (48, 80)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[exif["id"]])):
        assert coco.annToMask(ann).shape == (80, 48)
