"""segpipe.io: listing/sharding/fingerprinting a source, and decoding bytes to oriented RGB uint8."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from segpipe.io.decode import DecodeError, decode_image
from segpipe.io.listing import fingerprint, image_id_for, list_source

PATS = ["*.jpg", "*.png"]


# --- listing -------------------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """root/{b.jpg, A.JPG, c.png, notes.txt, sub/d.jpg, sub/deeper/e.PNG}."""
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    for rel, n in [("b.jpg", 3), ("A.JPG", 5), ("c.png", 7), ("notes.txt", 2), ("sub/d.jpg", 11), ("sub/deeper/e.PNG", 13)]:
        (root / rel).write_bytes(b"x" * n)
    return root


def _rels(files) -> list[str]:
    return [f.relpath for f in files]


def test_list_source_sorted_deterministic_and_case_insensitive(tree: Path):
    a = list_source(str(tree), patterns=PATS)
    b = list_source(str(tree), patterns=PATS)
    assert a == b
    uris = [f.uri for f in a]
    assert uris == sorted(uris)
    # Upper-case extensions match lower-case patterns; notes.txt matches nothing.
    assert sorted(_rels(a)) == sorted(["A.JPG", "b.jpg", "c.png", "sub/d.jpg", "sub/deeper/e.PNG"])
    assert all(not f.relpath.endswith(".txt") for f in a)
    assert [f.index for f in a] == list(range(len(a)))
    # Sizes are the real byte counts.
    assert {f.relpath: f.size for f in a} == {"A.JPG": 5, "b.jpg": 3, "c.png": 7, "sub/d.jpg": 11, "sub/deeper/e.PNG": 13}


def test_list_source_upper_case_pattern(tree: Path):
    files = list_source(str(tree), patterns=["*.JPG"])
    assert sorted(_rels(files)) == ["A.JPG", "b.jpg", "sub/d.jpg"]


def test_list_source_recursive_vs_not(tree: Path):
    flat = list_source(str(tree), patterns=PATS, recursive=False)
    assert sorted(_rels(flat)) == ["A.JPG", "b.jpg", "c.png"]
    deep = list_source(str(tree), patterns=PATS, recursive=True)
    assert "sub/d.jpg" in _rels(deep) and "sub/deeper/e.PNG" in _rels(deep)
    for f in deep:
        assert f.uri == str(tree / f.relpath)  # local URIs are absolute paths; relpath is root-relative


def test_list_source_max_images_and_shards(tmp_path: Path):
    for i in range(10):
        (tmp_path / f"img_{i:02d}.jpg").write_bytes(b"j")
    files = list_source(str(tmp_path), patterns=["*.jpg"], shard_size=3)
    assert [f.shard for f in files] == [i // 3 for i in range(10)]
    assert [f.relpath for f in files] == [f"img_{i:02d}.jpg" for i in range(10)]
    cut = list_source(str(tmp_path), patterns=["*.jpg"], max_images=4, shard_size=3)
    assert [f.relpath for f in cut] == [f"img_{i:02d}.jpg" for i in range(4)]
    assert [f.shard for f in cut] == [0, 0, 0, 1]


def test_list_source_follows_symlinks_to_files(tree: Path, tmp_path: Path):
    """A folder of links to images elsewhere lists like the images; a dangling link or a link to
    a folder is not an image."""
    links = tmp_path / "links"
    links.mkdir()
    (links / "b.jpg").symlink_to(tree / "b.jpg")
    (links / "d.jpg").symlink_to(tree / "sub" / "d.jpg")
    (links / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (links / "dir.jpg").symlink_to(tree / "sub")
    files = list_source(str(links), patterns=PATS)
    assert {f.relpath: f.size for f in files} == {"b.jpg": 3, "d.jpg": 11}
    assert [f.uri for f in files] == [str(links / "b.jpg"), str(links / "d.jpg")]


def test_list_source_missing_raises(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        list_source(str(tmp_path / "nope"), patterns=PATS)


def test_list_source_single_file(tree: Path):
    files = list_source(str(tree / "sub" / "d.jpg"), patterns=PATS)
    assert len(files) == 1
    f = files[0]
    assert f.relpath == "d.jpg" and f.uri == str(tree / "sub" / "d.jpg") and f.size == 11 and f.shard == 0


def test_list_source_on_memory_filesystem():
    """The same listing body on a non-local fsspec filesystem (injected, as for S3)."""
    fs = fsspec.filesystem("memory")
    root = "/segpipe-test-listing"
    try:
        for rel in ["x.jpg", "Y.PNG", "z.txt", "s/w.jpg"]:
            fs.pipe_file(f"{root}/{rel}", b"abc")
        files = list_source(f"memory://{root}", patterns=PATS, fs=fs)
        assert _rels(files) == sorted(_rels(files), key=lambda r: f"{root}/{r}")
        assert sorted(_rels(files)) == sorted(["x.jpg", "Y.PNG", "s/w.jpg"])
        assert all(f.uri.startswith("memory://") for f in files)
        assert sorted(_rels(list_source(f"memory://{root}", patterns=PATS, recursive=False, fs=fs))) == ["Y.PNG", "x.jpg"]
    finally:
        fs.rm(root, recursive=True)


def test_image_id_for():
    uris = [f"s3://bucket/img_{i}.jpg" for i in range(500)] + ["/data/a.jpg", "/data/b.jpg"]
    ids = [image_id_for(u) for u in uris]
    assert ids == [image_id_for(u) for u in uris]  # stable
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, int) and 0 < i < 2**63 for i in ids)
    assert image_id_for("/data/a.jpg") == image_id_for("/data/a.jpg")


def test_listing_image_ids_match_uris(tree: Path):
    for f in list_source(str(tree), patterns=PATS):
        assert f.image_id == image_id_for(f.uri)


def test_fingerprint_stable_and_changes_with_size(tree: Path):
    fp1 = fingerprint(list_source(str(tree), patterns=PATS))
    fp2 = fingerprint(list_source(str(tree), patterns=PATS))
    assert fp1 == fp2
    (tree / "c.png").write_bytes(b"y" * 99)  # rewrite: size (and mtime) change
    fp3 = fingerprint(list_source(str(tree), patterns=PATS))
    assert fp3 != fp1
    assert fingerprint(list_source(str(tree), patterns=PATS)) == fp3


def test_fingerprint_order_and_membership(tree: Path):
    files = list_source(str(tree), patterns=PATS)
    assert fingerprint(files[:-1]) != fingerprint(files)
    assert fingerprint(list(reversed(files))) != fingerprint(files)


# --- decoding ------------------------------------------------------------------------------------

BIG = 10**8


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 7 % 256, yy * 9 % 256, (xx + yy) * 3 % 256], axis=-1).astype(np.uint8)


def test_decode_rgb_png_exact():
    arr = _gradient()
    out = decode_image(_save(Image.fromarray(arr), "PNG"), max_pixels=BIG)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, arr)


def test_decode_rgb_jpeg():
    arr = _gradient()
    out = decode_image(_save(Image.fromarray(arr), "JPEG", quality=95), max_pixels=BIG)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    assert np.abs(out.astype(int) - arr.astype(int)).mean() < 8


def test_decode_applies_exif_orientation():
    # Stored 40 wide x 20 tall, grey, with a red 8x8 block in the stored top-left corner.
    arr = np.full((20, 40, 3), 128, np.uint8)
    arr[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    out = decode_image(data, max_pixels=BIG)
    assert out.shape == (40, 20, 3)  # H and W swapped
    # A clockwise quarter turn moves the stored top-left corner to the displayed top-right.
    top_right = out[:8, -8:].reshape(-1, 3).mean(0)
    top_left = out[:8, :8].reshape(-1, 3).mean(0)
    bottom_left = out[-8:, :8].reshape(-1, 3).mean(0)
    assert top_right[0] > 200 and top_right[1] < 60 and top_right[2] < 60, top_right
    for other in (top_left, bottom_left):
        assert abs(other[0] - 128) < 20, other


def test_decode_grey_L():
    g = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    out = decode_image(_save(Image.fromarray(g, mode="L"), "PNG"), max_pixels=BIG)
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_decode_palette_P():
    idx = np.zeros((6, 8), np.uint8)
    idx[:, 4:] = 1
    img = Image.fromarray(idx, mode="P")
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (254 * 3))
    data = _save(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, max_pixels=BIG)
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[5, 7]) == (200, 100, 50)


def test_decode_rgba_drops_alpha():
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., :3] = _gradient(5, 7)
    rgba[..., 3] = np.arange(35).reshape(5, 7)  # varying alpha, some fully transparent
    data = _save(Image.fromarray(rgba, mode="RGBA"), "PNG")
    out = decode_image(data, max_pixels=BIG)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_decode_cmyk_jpeg():
    img = Image.new("CMYK", (16, 8), (255, 0, 0, 0))  # pure cyan
    data = _save(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, max_pixels=BIG)
    assert out.dtype == np.uint8 and out.shape == (8, 16, 3)
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r < 40 and g > 215 and b > 215, (r, g, b)


def test_decode_16bit_scaled_by_max():
    a = np.array([[0, 250, 500], [1000, 750, 100]], np.uint16)
    img = Image.fromarray(a)
    data = _save(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, max_pixels=BIG)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert tuple(out[1, 0]) == (255, 255, 255)  # the max pixel
    assert tuple(out[0, 0]) == (0, 0, 0)
    expected = (a.astype(np.float64) / 1000 * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_decode_empty_bytes():
    with pytest.raises(DecodeError) as ei:
        decode_image(b"", max_pixels=BIG)
    assert ei.value.error_type == "empty_file"


def test_decode_html_is_not_an_image():
    with pytest.raises(DecodeError) as ei:
        decode_image(b"<html><body>not an image</body></html>", max_pixels=BIG)
    assert ei.value.error_type == "not_an_image"


def test_decode_truncated_jpeg():
    rng = np.random.default_rng(0)
    data = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    with pytest.raises(DecodeError) as ei:
        decode_image(data[: len(data) // 3], max_pixels=BIG)
    assert ei.value.error_type in {"truncated", "corrupt", "unreadable"}


def test_decode_shapes_data_bad_files(shapes_data: Path):
    """The shared fixture's two bad files are refused with their own error types."""
    with pytest.raises(DecodeError) as ei:
        decode_image((shapes_data / "images" / "corrupt.jpg").read_bytes(), max_pixels=BIG)
    assert ei.value.error_type in {"truncated", "corrupt", "unreadable"}
    with pytest.raises(DecodeError) as ei:
        decode_image((shapes_data / "images" / "notes.png").read_bytes(), max_pixels=BIG)
    assert ei.value.error_type == "not_an_image"


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h RGB but whose pixel data is a few bytes: decoding it fails."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_decode_too_large():
    data = _save(Image.fromarray(_gradient(20, 30)), "PNG")
    assert decode_image(data, max_pixels=600).shape == (20, 30, 3)  # exactly at the limit is fine
    with pytest.raises(DecodeError) as ei:
        decode_image(data, max_pixels=599)
    assert ei.value.error_type == "too_large"


def test_decode_too_large_checked_before_pixels():
    data = _png_header_only(5000, 5000)
    # With room to decode, the missing pixel data is an error of another kind...
    with pytest.raises(DecodeError) as ei:
        decode_image(data, max_pixels=10**9)
    assert ei.value.error_type != "too_large"
    # ...but over the limit it is refused from the header alone, before any pixel is decoded.
    with pytest.raises(DecodeError) as ei:
        decode_image(data, max_pixels=1000)
    assert ei.value.error_type == "too_large"


def test_decode_decompression_bomb_is_too_large():
    """A header far past Pillow's own bomb limit (which fires inside Image.open) is still 'too_large'."""
    with pytest.raises(DecodeError) as ei:
        decode_image(_png_header_only(20000, 20000), max_pixels=64_000_000)
    assert ei.value.error_type == "too_large"


def test_read_parquet_never_lets_arrow_threads_touch_the_python_file():
    """Handed a Python file object, Arrow reads it from its own IO threads (a buffer holding a
    Python object can then be released on one at interpreter exit: SIGABRT). ``read_parquet``
    reads the bytes on the calling thread and gives Arrow its own copy."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec.implementations.memory import MemoryFileSystem

    from segpipe.io.fs import read_parquet

    class SpyFile(io.BytesIO):
        def __init__(self, data: bytes, threads: set) -> None:
            super().__init__(data)
            self.threads = threads

        def read(self, *a):
            self.threads.add(threading.get_ident())
            return super().read(*a)

        def readinto(self, b):
            self.threads.add(threading.get_ident())
            return super().readinto(b)

    table = pa.table({"a": list(range(50000)), "b": [str(i) for i in range(50000)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=5000)
    threads: set = set()

    class SpyFS(MemoryFileSystem):
        def _open(self, path, mode="rb", **kw):
            return SpyFile(buf.getvalue(), threads)

    fs = SpyFS()
    here = threading.get_ident()
    pq.read_table(fs.open("/t.parquet", "rb"))
    assert threads - {here}  # what the plain call does: Arrow's threads read the Python file
    threads.clear()
    assert read_parquet(fs, "/t.parquet").equals(table)
    assert read_parquet(fs, "/t.parquet", ["b"]).equals(table.select(["b"]))
    assert threads == {here}
