"""Stage download, offline parts: payload verification and the choice of sources (MNIST_MIRROR).

The HTTP fault-injection tests live in test_download.py.
"""

import gzip
import hashlib
from pathlib import Path

from common import PipelineError

import pytest

import download
from download import FILES, PUBLIC_MIRRORS, sources, verify

SMALLEST = "t10k-labels-idx1-ubyte"  # 10,008 bytes: the cheapest real file to verify


@pytest.fixture
def payload(mirror):
    """The decompressed bytes of the smallest MNIST file, from the local mirror."""
    if "://" in mirror:
        pytest.skip("needs the mirror as a directory")
    return gzip.decompress((Path(mirror) / f"{SMALLEST}.gz").read_bytes())


def gz(path, data, level=9):
    path.write_bytes(gzip.compress(data, compresslevel=level))
    return path


@pytest.fixture
def fake_file(monkeypatch):
    """Pin a synthetic file in FILES, so tests need no real data."""
    data = bytes(range(256)) * 40
    monkeypatch.setitem(FILES, "fake-idx1-ubyte", (hashlib.sha256(data).hexdigest(), len(data)))
    return "fake-idx1-ubyte", data


# --- the pinned values ----------------------------------------------------------------------------


def test_pinned_checksums_match_the_mirrors_sha256sums(mirror):
    """The values pinned in the code are the published ones, as listed beside the local mirror."""
    if "://" in mirror:
        pytest.skip("needs the mirror as a directory")
    listed = {}
    for line in (Path(mirror) / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name.lstrip("*").removesuffix(".gz")] = digest
    assert {name: digest for name, (digest, _) in FILES.items()} == listed


def test_pinned_sizes_are_the_idx_sizes():
    assert FILES["train-images-idx3-ubyte"][1] == 16 + 60000 * 28 * 28
    assert FILES["train-labels-idx1-ubyte"][1] == 8 + 60000
    assert FILES["t10k-images-idx3-ubyte"][1] == 16 + 10000 * 28 * 28
    assert FILES["t10k-labels-idx1-ubyte"][1] == 8 + 10000


# --- verify ---------------------------------------------------------------------------------------


def test_verify_accepts_the_real_file(mirror):
    if "://" in mirror:
        pytest.skip("needs the mirror as a directory")
    verify(Path(mirror) / f"{SMALLEST}.gz", SMALLEST)  # no exception


@pytest.mark.parametrize("level", [1, 6, 9])
def test_verify_accepts_any_gzip_level(tmp_path, payload, level):
    """The checksum is of the payload, so a mirror that recompressed the file still verifies."""
    path = gz(tmp_path / "x.gz", payload, level)
    verify(path, SMALLEST)


def test_verify_accepts_recompressed_file_with_other_gzip_bytes(tmp_path, payload, mirror):
    original = (Path(mirror) / f"{SMALLEST}.gz").read_bytes()
    path = gz(tmp_path / "x.gz", payload, level=1)
    assert path.read_bytes() != original  # really different .gz bytes
    verify(path, SMALLEST)


def test_verify_rejects_one_flipped_byte(tmp_path, payload):
    corrupt = bytearray(payload)
    corrupt[5000] ^= 0x01  # same size, one label changed
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(gz(tmp_path / "x.gz", bytes(corrupt)), SMALLEST)


def test_verify_rejects_another_files_payload(tmp_path, payload):
    with pytest.raises(ValueError):
        verify(gz(tmp_path / "x.gz", payload), "train-labels-idx1-ubyte")


def test_verify_rejects_truncated_payload(tmp_path, payload):
    with pytest.raises(ValueError, match="truncated payload"):
        verify(gz(tmp_path / "x.gz", payload[:-1]), SMALLEST)


def test_verify_rejects_oversized_payload(tmp_path, payload):
    with pytest.raises(ValueError, match="more than the 10008 bytes"):
        verify(gz(tmp_path / "x.gz", payload + b"\0"), SMALLEST)


def test_verify_synthetic_good_and_bad(tmp_path, fake_file):
    name, data = fake_file
    verify(gz(tmp_path / "good.gz", data), name)
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(gz(tmp_path / "bad.gz", data[::-1]), name)  # same size and bytes, other order


def test_verify_truncated_gzip_is_an_error(tmp_path, fake_file):
    name, data = fake_file
    compressed = gzip.compress(data)
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises((EOFError, OSError, ValueError)):  # download() retries or rejects all three
        verify(path, name)


def corrupt_deflate(data):
    compressed = bytearray(gzip.compress(data))
    compressed[10] = 0xFF  # the first deflate block gets the reserved block type: zlib.error
    return bytes(compressed)


def test_download_reports_corrupt_deflate_stream_as_bad_content(tmp_path, fake_file):
    """A corrupt gzip is a one-line PipelineError naming the mirror, not a zlib.error traceback."""
    name, data = fake_file
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{name}.gz").write_bytes(corrupt_deflate(data))
    with pytest.raises(PipelineError, match=name) as e:
        download.download(name, tmp_path / "out.gz", [mirror.as_uri() + "/"], timeout=5, retries=0)
    assert mirror.as_uri() in str(e.value)


def test_download_from_file_url_verifies_and_rejects(tmp_path, fake_file):
    """download() over a file:// mirror: a good file lands in dest, a corrupt one is a PipelineError."""
    name, data = fake_file
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    gz(good / f"{name}.gz", data, level=1)
    gz(bad / f"{name}.gz", data[::-1])
    dest = tmp_path / "out.gz"
    download.download(name, dest, [good.as_uri() + "/"], timeout=5, retries=0)
    assert gzip.decompress(dest.read_bytes()) == data
    with pytest.raises(PipelineError, match="checksum mismatch") as e:
        download.download(name, tmp_path / "out2.gz", [bad.as_uri() + "/"], timeout=5, retries=0)
    assert bad.as_uri() in str(e.value)


@pytest.mark.parametrize(
    "damage",
    [lambda data: gzip.compress(data[::-1]), corrupt_deflate],
    ids=["checksum-mismatch", "corrupt-gzip"],
)
def test_download_moves_on_to_the_next_mirror(tmp_path, fake_file, damage):
    name, data = fake_file
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    (bad / f"{name}.gz").write_bytes(damage(data))
    gz(good / f"{name}.gz", data)
    dest = tmp_path / "out.gz"
    download.download(name, dest, [bad.as_uri() + "/", good.as_uri() + "/"], timeout=5, retries=0)
    assert gzip.decompress(dest.read_bytes()) == data


# --- sources --------------------------------------------------------------------------------------


def test_sources_without_mirror_are_the_public_ones_https_first(monkeypatch):
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    bases = sources()
    assert bases == list(PUBLIC_MIRRORS)
    assert bases[0].startswith("https://")
    assert all(base.endswith("/") for base in bases)


def test_sources_blank_mirror_means_public(monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", "  ")
    assert sources() == list(PUBLIC_MIRRORS)


def test_sources_plain_directory_becomes_one_file_url(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    assert sources() == [tmp_path.resolve().as_uri() + "/"]


def test_sources_relative_directory_is_resolved(monkeypatch, tmp_path):
    (tmp_path / "mnist").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_MIRROR", "mnist")
    assert sources() == [(tmp_path / "mnist").resolve().as_uri() + "/"]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_sources_file_url_is_used_as_given(monkeypatch, tmp_path, suffix):
    url = tmp_path.as_uri() + suffix
    monkeypatch.setenv("MNIST_MIRROR", url)
    assert sources() == [tmp_path.as_uri() + "/"]


@pytest.mark.parametrize("url", ["http://mirror.local:8000/mnist", "https://example.org/mnist/"])
def test_sources_http_url_is_the_only_source(monkeypatch, url):
    monkeypatch.setenv("MNIST_MIRROR", url)
    assert sources() == [url.rstrip("/") + "/"]


def test_sources_missing_directory_is_an_error_naming_it(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv("MNIST_MIRROR", str(missing))
    with pytest.raises(PipelineError, match="no such directory") as e:
        sources()
    assert str(missing) in str(e.value)
    assert "MNIST_MIRROR" in str(e.value)


def test_sources_a_file_is_not_a_mirror_directory(monkeypatch, tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"")
    monkeypatch.setenv("MNIST_MIRROR", str(path))
    with pytest.raises(PipelineError, match="no such directory"):
        sources()


def test_sources_mirror_directory_feeds_download(monkeypatch, tmp_path, fake_file):
    """What sources() returns for a directory is a base that download() can fetch from."""
    name, data = fake_file
    gz(tmp_path / f"{name}.gz", data)
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    dest = tmp_path / "out.gz"
    download.download(name, dest, sources(), timeout=5, retries=0)
    assert gzip.decompress(dest.read_bytes()) == data
