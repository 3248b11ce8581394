"""Stage download: fetch the dataset's four IDX files into data/raw, keeping them only once verified."""

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from stages.common import PipelineError, atomic_path, load_params, run

from tqdm import tqdm

OUT = Path("data/raw")
FILES = {  # each decompressed payload's size: both datasets hold 60,000 + 10,000 images of 28x28
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
# The published SHA-256 of each decompressed payload, in sha256sum format: they verify any mirror,
# however it gzipped the files. <PREFIX>_SHA256SUMS names another such file (your own IDX data).
CHECKSUMS = Path(__file__).parent / "checksums"  # <dataset>.sha256
PUBLIC_MIRRORS = {  # HTTPS first
    "mnist": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",  # the original host last: it often refuses downloads
    ),
    "fashion-mnist": (
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",  # Keras's copy
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",  # the authors'
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # torchvision's
    ),
}
# Without pinned sizes, a payload may hold only what its IDX header declares, and no header more
# than this: what bounds the disk a wrong mirror can fill.
MAX_PAYLOAD = 1 << 30


def env_number(name, default, cast, minimum, allowed):
    try:
        value = cast(os.environ.get(name, default))
    except ValueError:
        value = None
    if value is None or not minimum <= value < float("inf"):  # also refuses nan
        raise PipelineError(f"{name} must be {allowed}, got {os.environ[name]!r}")
    return value


def prefix(dataset):
    """MNIST or FASHION_MNIST: how the dataset's environment variables begin."""
    return dataset.upper().replace("-", "_")


def hint(dataset):
    return f"set {prefix(dataset)}_MIRROR to a URL or directory holding the four .gz files"


def sources(dataset):
    """The mirror base URLs to try, in order: <PREFIX>_MIRROR alone if it is set."""
    var = f"{prefix(dataset)}_MIRROR"
    mirror = os.environ.get(var, "").strip()
    if not mirror:
        return list(PUBLIC_MIRRORS[dataset])
    if "://" not in mirror:
        path = Path(mirror).expanduser().resolve()
        if not path.is_dir():
            raise PipelineError(f"{var}={mirror}: no such directory; {hint(dataset)}")
        mirror = path.as_uri()
    return [mirror.rstrip("/") + "/"]


def expected(dataset):
    """{name: (SHA-256, size)} to verify: the pinned values, or <PREFIX>_SHA256SUMS's with no size."""
    var = f"{prefix(dataset)}_SHA256SUMS"
    path = os.environ.get(var, "").strip()
    where = f"{var}={path}" if path else f"{CHECKSUMS / dataset}.sha256"
    try:
        lines = Path(path or where).expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{where}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    listed = {}
    for number, line in enumerate(lines, 1):
        digest, _, name = line.strip().partition(" ")
        if not line.strip():
            continue
        if not (re.fullmatch(r"[0-9a-fA-F]{64}", digest) and name.strip()):
            raise PipelineError(f"{where}: line {number} is not `<sha256>  <file name>`: {line!r}")
        listed[name.strip().lstrip("*").removesuffix(".gz")] = digest.lower()
    if missing := [name for name in FILES if name not in listed]:
        raise PipelineError(f"{where}: no SHA-256 for {', '.join(missing)}")
    return {name: (listed[name], None if path else size) for name, size in FILES.items()}


@contextlib.contextmanager
def deadline(seconds):
    """Raise TimeoutError in the block once `seconds` have passed: a socket timeout bounds each read,
    and a mirror that trickles a byte now and then would never trip it."""

    def expire(signum, frame):
        raise TimeoutError(f"timed out: the file took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fetch(url, dest, limit, timeout):
    """Stream url into dest within `timeout` seconds, refusing more than `limit` bytes so a hostile
    mirror cannot fill the disk."""
    with (
        deadline(timeout),
        urllib.request.urlopen(url, timeout=timeout) as response,
        open(dest, "wb") as f,
    ):
        size = int(response.headers.get("Content-Length") or 0)
        if size > limit:
            raise ValueError(f"announces {size} bytes, more than the {limit} expected")
        with tqdm(
            total=size or None, unit="B", unit_scale=True, desc=Path(dest).name, leave=False, disable=None
        ) as bar:
            received = 0
            while chunk := response.read(1 << 16):
                received += len(chunk)
                if received > limit:
                    raise ValueError(f"sent more than the {limit} bytes expected, stopped reading")
                f.write(chunk)
                bar.update(len(chunk))
    if size and received < size:
        raise ConnectionError(f"truncated: got {received} of {size} bytes")


def idx_size(header):
    """The payload size an IDX header of unsigned bytes declares: magic 0, 0, 8, ndim; each dimension."""
    if len(header) < 4 or header[:3] != b"\0\0\x08" or len(header) != 4 + 4 * header[3]:
        raise ValueError("not an IDX file of unsigned bytes")
    size = len(header) + math.prod(struct.unpack(f">{header[3]}I", header[4:]))
    if size > MAX_PAYLOAD:
        raise ValueError(f"its IDX header declares {size} bytes, more than the {MAX_PAYLOAD} allowed")
    return size


def verify(path, digest, size=None):
    """Check the decompressed payload's SHA-256, and its size: `size`, or what its IDX header declares."""
    sha, n = hashlib.sha256(), 0
    try:
        with gzip.open(path) as f:
            if size is None:
                header = f.read(4)
                header += f.read(4 * header[3]) if len(header) == 4 else b""
                size = idx_size(header)
                sha.update(header)
                n = len(header)
            while chunk := f.read(1 << 20):
                n += len(chunk)
                if n > size:
                    raise ValueError(f"decompresses to more than the {size} bytes expected")
                sha.update(chunk)
    except EOFError:  # the transfer stopped early: worth another try
        raise ConnectionError("truncated: the gzip stream ends early") from None
    except (gzip.BadGzipFile, zlib.error) as e:  # bad content: retrying the same mirror won't help
        raise ValueError(f"not a valid gzip file ({e})") from None
    if n != size:
        raise ValueError(f"truncated payload: {n} of {size} bytes")
    if sha.hexdigest() != digest:
        raise ValueError("checksum mismatch: the payload is corrupt")


def download(name, pin, dest, bases, timeout, retries):
    """Fetch name.gz into dest, verified against pin (SHA-256, size or None); try each mirror in turn,
    retry transient failures, move on at once from bad content."""
    digest, size = pin
    failures = []
    limit = (size or MAX_PAYLOAD) * 101 // 100 + 65536  # gzip never grows data by more
    for base in bases:
        url = f"{base}{name}.gz"
        for attempt in range(retries + 1):
            try:
                fetch(url, dest, limit, timeout)
                verify(dest, digest, size)
                return
            except urllib.error.HTTPError as e:
                reason, transient = f"HTTP {e.code}", e.code >= 500
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                # timeouts, resets, truncation: worth another try
                reason, transient = getattr(e, "reason", None) or str(e) or type(e).__name__, True
            except ValueError as e:
                reason, transient = str(e), False
            if not transient or attempt == retries:
                failures.append(f"{url}: {reason}")
                break
            time.sleep(min(2**attempt, 10) * 0.5)
    raise PipelineError(f"could not get {name}.gz; tried " + "; ".join(failures))


def main():
    dataset = load_params("data")["data"]["dataset"]
    var = prefix(dataset)
    # seconds each file may take (0 would mean non-blocking sockets, so at least 1 ms)
    timeout = env_number(f"{var}_TIMEOUT", 30, float, 0.001, "a positive number of seconds")
    retries = env_number(f"{var}_RETRIES", 2, int, 0, "a non-negative integer")
    bases, pins = sources(dataset), expected(dataset)
    with tempfile.TemporaryDirectory() as scratch, atomic_path(OUT) as staged:
        staged.mkdir()
        for name, pin in pins.items():
            dest = Path(scratch) / f"{name}.gz"
            try:
                download(name, pin, dest, bases, timeout, retries)
            except PipelineError as e:
                raise PipelineError(f"{e}. {hint(dataset)}") from None
            shutil.move(dest, staged / dest.name)  # only verified files ever reach data/
    print(f"download: {len(pins)} {dataset} files verified in {OUT}")


if __name__ == "__main__":
    run(main)
