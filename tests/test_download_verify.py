"""Stage download, offline parts: payload verification, the checksums it verifies against
(pinned, or <PREFIX>_SHA256SUMS), and the choice of sources (<PREFIX>_MIRROR).

The HTTP fault-injection tests live in test_download.py.
"""

import gzip
import hashlib
import os
from pathlib import Path

from stages.common import PipelineError

import numpy as np
import pytest
from conftest import ROOT
from synthetic_idx import idx_bytes

from stages import download
from stages.download import FILES, MAX_PAYLOAD, PUBLIC_MIRRORS, expected, sources, verify

SMALLEST = "t10k-labels-idx1-ubyte"  # the cheapest file to verify


@pytest.fixture
def synthetic(synthetic_env):
    """(the synthetic MNIST mirror, its SHA256SUMS file)."""
    return Path(synthetic_env["MNIST_MIRROR"]), Path(synthetic_env["MNIST_SHA256SUMS"])


@pytest.fixture
def payload(synthetic):
    """The decompressed bytes of the synthetic mirror's smallest file, and their (SHA-256, size)."""
    data = gzip.decompress((synthetic[0] / f"{SMALLEST}.gz").read_bytes())
    return data, (hashlib.sha256(data).hexdigest(), len(data))


def gz(path, data, level=9):
    path.write_bytes(gzip.compress(data, compresslevel=level))
    return path


@pytest.fixture
def fake_file():
    """A synthetic file and its pin (SHA-256, size), so tests need no real data."""
    data = bytes(range(256)) * 40
    return "fake-idx1-ubyte", data, (hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture
def no_overrides(monkeypatch):
    for name in ("MNIST_SHA256SUMS", "FASHION_MNIST_SHA256SUMS", "MNIST_MIRROR", "FASHION_MNIST_MIRROR"):
        monkeypatch.delenv(name, raising=False)


# --- the pinned values ----------------------------------------------------------------------------


def real_copy(dataset, request):
    """A local directory holding the real dataset with its SHA256SUMS, or a skip saying how to get one."""
    if dataset == "mnist":
        found = request.getfixturevalue("mirror")
    else:
        found = os.environ.get("FASHION_MNIST_MIRROR") or str(ROOT.parent / "shared" / "fashion-mnist")
    if "://" in found or not (Path(found) / "SHA256SUMS").is_file():
        pytest.skip(
            f"needs a local copy of the real {dataset} with its SHA256SUMS: ../shared/{dataset} beside "
            f"the repository, or {download.prefix(dataset)}_MIRROR set to such a directory"
        )
    return Path(found)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_pinned_checksums_match_the_mirrors_sha256sums(dataset, request, no_overrides):
    """The values pinned in stages/checksums are the published ones, as listed beside the local copy."""
    listed = {}
    for line in (real_copy(dataset, request) / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name.lstrip("*").removesuffix(".gz")] = digest
    assert {name: digest for name, (digest, _) in expected(dataset).items()} == listed


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_verify_accepts_the_real_file(dataset, request, no_overrides):
    verify(real_copy(dataset, request) / f"{SMALLEST}.gz", *expected(dataset)[SMALLEST])  # no exception


def test_pinned_sizes_are_the_idx_sizes(no_overrides):
    assert FILES["train-images-idx3-ubyte"] == 16 + 60000 * 28 * 28
    assert FILES["train-labels-idx1-ubyte"] == 8 + 60000
    assert FILES["t10k-images-idx3-ubyte"] == 16 + 10000 * 28 * 28
    assert FILES["t10k-labels-idx1-ubyte"] == 8 + 10000
    for dataset in ("mnist", "fashion-mnist"):
        assert {name: size for name, (_, size) in expected(dataset).items()} == FILES


def test_the_two_datasets_pin_different_files(no_overrides):
    mnist, fashion = expected("mnist"), expected("fashion-mnist")
    assert not {digest for digest, _ in mnist.values()} & {digest for digest, _ in fashion.values()}


# --- <PREFIX>_SHA256SUMS: your own checksums --------------------------------------------------------


def test_sha256sums_replaces_the_pinned_values_and_sizes(monkeypatch, tmp_path, no_overrides):
    digests = {name: hashlib.sha256(name.encode()).hexdigest() for name in FILES}
    lines = [f"{digests[name]}  {name}" for name in FILES]
    lines[1] = lines[1].replace("  ", " *") + ".gz"  # binary-mode marker and a .gz name are fine too
    (tmp_path / "sums").write_text("\n" + "\n".join(lines) + "\n\n")
    monkeypatch.setenv("MNIST_SHA256SUMS", str(tmp_path / "sums"))
    assert expected("mnist") == {name: (digests[name], None) for name in FILES}  # sizes from the headers
    assert expected("fashion-mnist")["t10k-labels-idx1-ubyte"][1] == 10008  # the other dataset: pinned


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "MNIST_SHA256SUMS={path}: unreadable (No such file or directory)"),
        (
            "not a checksum  train-images-idx3-ubyte\n",
            "MNIST_SHA256SUMS={path}: line 1 is not `<sha256>  <file name>`",
        ),
        ("a" * 64 + "\n", "MNIST_SHA256SUMS={path}: line 1 is not"),
        (
            "a" * 64 + "  train-images-idx3-ubyte\n",
            "MNIST_SHA256SUMS={path}: no SHA-256 for train-labels-idx1-ubyte, t10k",
        ),
    ],
    ids=["missing", "bad-digest", "no-name", "missing-names"],
)
def test_bad_sha256sums_is_one_line_naming_the_variable(monkeypatch, tmp_path, content, message):
    path = tmp_path / "sums"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("MNIST_SHA256SUMS", str(path))
    with pytest.raises(PipelineError) as e:
        expected("mnist")
    assert str(e.value).startswith(message.format(path=path))
    assert "\n" not in str(e.value)


def test_verify_without_size_holds_the_payload_to_its_idx_header(tmp_path):
    labels = idx_bytes((np.arange(1000) % 10).astype(np.uint8))
    digest = hashlib.sha256(labels).hexdigest()
    verify(gz(tmp_path / "ok.gz", labels), digest)  # 8 + 1000 bytes, as its header says
    with pytest.raises(ValueError, match="decompresses to more than the 1008 bytes expected"):
        verify(gz(tmp_path / "long.gz", labels + b"\0"), digest)
    with pytest.raises(ValueError, match="truncated payload: 1007 of 1008 bytes"):
        verify(gz(tmp_path / "short.gz", labels[:-1]), digest)
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(gz(tmp_path / "other.gz", labels[:8] + labels[8:][::-1]), digest)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<html>200 OK</html>", "not an IDX file of unsigned bytes"),
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4), "not an IDX file of unsigned bytes"),  # float32
        (bytes([0, 0, 8, 3]) + bytes([0, 0]), "not an IDX file of unsigned bytes"),  # header cut short
        (
            bytes([0, 0, 8, 3, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]),
            "its IDX header declares",
        ),  # 65536**3 bytes
    ],
    ids=["html", "float32", "short-header", "too-big"],
)
def test_verify_without_size_refuses_other_headers(tmp_path, data, reason):
    with pytest.raises(ValueError, match=reason):
        verify(gz(tmp_path / "x.gz", data), hashlib.sha256(data).hexdigest())


def test_a_gzip_bomb_without_pinned_size_stops_at_its_header(tmp_path):
    """A header that declares 1,000 bytes followed by 50 MB: verify stops reading after the first MB."""
    header = bytes([0, 0, 8, 1, 0, 0, 3, 232])
    with pytest.raises(ValueError, match="decompresses to more than the 1008 bytes expected"):
        verify(gz(tmp_path / "bomb.gz", header + bytes(50 << 20), level=1), "0" * 64)
    assert FILES["train-images-idx3-ubyte"] <= MAX_PAYLOAD  # datasets of MNIST's size fit


# --- verify ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize("size", [True, False], ids=["pinned-size", "header-size"])
def test_verify_accepts_any_gzip_level(tmp_path, payload, level, size):
    """The checksum is of the payload, so a mirror that recompressed the file still verifies."""
    data, (digest, n) = payload
    path = gz(tmp_path / "x.gz", data, level)
    verify(path, digest, n if size else None)


def test_verify_accepts_recompressed_file_with_other_gzip_bytes(tmp_path, payload, synthetic):
    data, pin = payload
    original = (synthetic[0] / f"{SMALLEST}.gz").read_bytes()
    path = gz(tmp_path / "x.gz", data, level=9)
    assert path.read_bytes() != original  # really different .gz bytes
    verify(path, *pin)


def test_verify_rejects_one_flipped_byte(tmp_path, payload):
    data, pin = payload
    corrupt = bytearray(data)
    corrupt[500] ^= 0x01  # same size, one label changed
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(gz(tmp_path / "x.gz", bytes(corrupt)), *pin)


def test_verify_rejects_another_files_payload(tmp_path, payload, synthetic):
    data, _ = payload
    other = dict(line.split()[::-1] for line in synthetic[1].read_text().splitlines())
    with pytest.raises(ValueError, match="truncated payload"):
        verify(gz(tmp_path / "x.gz", data), other["train-labels-idx1-ubyte"], 8 + 4000)
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(gz(tmp_path / "x.gz", data), other["train-labels-idx1-ubyte"])  # its header, its size


def test_verify_rejects_truncated_payload(tmp_path, payload):
    data, pin = payload
    with pytest.raises(ValueError, match="truncated payload"):
        verify(gz(tmp_path / "x.gz", data[:-1]), *pin)


def test_verify_rejects_oversized_payload(tmp_path, payload):
    data, pin = payload
    with pytest.raises(ValueError, match=f"more than the {len(data)} bytes"):
        verify(gz(tmp_path / "x.gz", data + b"\0"), *pin)


def test_verify_synthetic_good_and_bad(tmp_path, fake_file):
    _, data, pin = fake_file
    verify(gz(tmp_path / "good.gz", data), *pin)
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify(gz(tmp_path / "bad.gz", data[::-1]), *pin)  # same size and bytes, other order


def test_verify_truncated_gzip_is_an_error(tmp_path, fake_file):
    _, data, pin = fake_file
    compressed = gzip.compress(data)
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises((EOFError, OSError, ValueError)):  # download() retries or rejects all three
        verify(path, *pin)


def corrupt_deflate(data):
    compressed = bytearray(gzip.compress(data))
    compressed[10] = 0xFF  # the first deflate block gets the reserved block type: zlib.error
    return bytes(compressed)


def test_download_reports_corrupt_deflate_stream_as_bad_content(tmp_path, fake_file):
    """A corrupt gzip is a one-line PipelineError naming the mirror, not a zlib.error traceback."""
    name, data, pin = fake_file
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / f"{name}.gz").write_bytes(corrupt_deflate(data))
    with pytest.raises(PipelineError, match=name) as e:
        download.download(name, pin, tmp_path / "out.gz", [mirror.as_uri() + "/"], timeout=5, retries=0)
    assert mirror.as_uri() in str(e.value)


def test_download_from_file_url_verifies_and_rejects(tmp_path, fake_file):
    """download() over a file:// mirror: a good file lands in dest, a corrupt one is a PipelineError."""
    name, data, pin = fake_file
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    gz(good / f"{name}.gz", data, level=1)
    gz(bad / f"{name}.gz", data[::-1])
    dest = tmp_path / "out.gz"
    download.download(name, pin, dest, [good.as_uri() + "/"], timeout=5, retries=0)
    assert gzip.decompress(dest.read_bytes()) == data
    with pytest.raises(PipelineError, match="checksum mismatch") as e:
        download.download(name, pin, tmp_path / "out2.gz", [bad.as_uri() + "/"], timeout=5, retries=0)
    assert bad.as_uri() in str(e.value)


@pytest.mark.parametrize(
    "damage",
    [lambda data: gzip.compress(data[::-1]), corrupt_deflate],
    ids=["checksum-mismatch", "corrupt-gzip"],
)
def test_download_moves_on_to_the_next_mirror(tmp_path, fake_file, damage):
    name, data, pin = fake_file
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    (bad / f"{name}.gz").write_bytes(damage(data))
    gz(good / f"{name}.gz", data)
    dest = tmp_path / "out.gz"
    download.download(name, pin, dest, [bad.as_uri() + "/", good.as_uri() + "/"], timeout=5, retries=0)
    assert gzip.decompress(dest.read_bytes()) == data


# --- sources --------------------------------------------------------------------------------------


def test_sources_without_mirror_are_the_public_ones_https_first(monkeypatch):
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    bases = sources("mnist")
    assert bases == list(PUBLIC_MIRRORS["mnist"])
    assert bases[0].startswith("https://")
    assert all(base.endswith("/") for base in bases)


def test_sources_blank_mirror_means_public(monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", "  ")
    assert sources("mnist") == list(PUBLIC_MIRRORS["mnist"])


def test_sources_plain_directory_becomes_one_file_url(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    assert sources("mnist") == [tmp_path.resolve().as_uri() + "/"]


def test_sources_relative_directory_is_resolved(monkeypatch, tmp_path):
    (tmp_path / "mnist").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_MIRROR", "mnist")
    assert sources("mnist") == [(tmp_path / "mnist").resolve().as_uri() + "/"]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_sources_file_url_is_used_as_given(monkeypatch, tmp_path, suffix):
    url = tmp_path.as_uri() + suffix
    monkeypatch.setenv("MNIST_MIRROR", url)
    assert sources("mnist") == [tmp_path.as_uri() + "/"]


@pytest.mark.parametrize("url", ["http://mirror.local:8000/mnist", "https://example.org/mnist/"])
def test_sources_http_url_is_the_only_source(monkeypatch, url):
    monkeypatch.setenv("MNIST_MIRROR", url)
    assert sources("mnist") == [url.rstrip("/") + "/"]


def test_sources_missing_directory_is_an_error_naming_it(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv("MNIST_MIRROR", str(missing))
    with pytest.raises(PipelineError, match="no such directory") as e:
        sources("mnist")
    assert str(missing) in str(e.value)
    assert "MNIST_MIRROR" in str(e.value)


def test_sources_a_file_is_not_a_mirror_directory(monkeypatch, tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"")
    monkeypatch.setenv("MNIST_MIRROR", str(path))
    with pytest.raises(PipelineError, match="no such directory"):
        sources("mnist")


def test_sources_mirror_directory_feeds_download(monkeypatch, tmp_path, fake_file):
    """What sources("mnist") returns for a directory is a base that download() can fetch from."""
    name, data, pin = fake_file
    gz(tmp_path / f"{name}.gz", data)
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    dest = tmp_path / "out.gz"
    download.download(name, pin, dest, sources("mnist"), timeout=5, retries=0)
    assert gzip.decompress(dest.read_bytes()) == data


def test_each_dataset_has_its_own_mirror_variable(monkeypatch, tmp_path, no_overrides):
    monkeypatch.setenv("FASHION_MNIST_MIRROR", str(tmp_path))
    assert sources("mnist") == list(PUBLIC_MIRRORS["mnist"])  # MNIST_MIRROR unset: the public ones
    assert sources("fashion-mnist") == [tmp_path.resolve().as_uri() + "/"]
    monkeypatch.setenv("FASHION_MNIST_MIRROR", str(tmp_path / "missing"))
    with pytest.raises(
        PipelineError, match=r"FASHION_MNIST_MIRROR=.*missing: no such directory; set FASHION_MNIST"
    ):
        sources("fashion-mnist")


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_public_mirrors_are_https_first(dataset, no_overrides):
    bases = sources(dataset)
    assert bases == list(PUBLIC_MIRRORS[dataset]) and len(bases) >= 2
    assert bases[0].startswith("https://") and all(base.endswith("/") for base in bases)
    assert not set(PUBLIC_MIRRORS["mnist"]) & set(PUBLIC_MIRRORS["fashion-mnist"])
