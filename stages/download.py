"""Stage download: fetch the four MNIST IDX files into data/raw, keeping them only once verified."""

import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from common import PipelineError, atomic_path, run

from tqdm import tqdm

OUT = Path("data/raw")
# SHA-256 and size of each decompressed payload: the published values, so they verify any
# mirror however it gzipped the files.
FILES = {
    "train-images-idx3-ubyte": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
    "train-labels-idx1-ubyte": ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
    "t10k-images-idx3-ubyte": ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
    "t10k-labels-idx1-ubyte": ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
}
PUBLIC_MIRRORS = (  # HTTPS first; the original host last, it often refuses downloads
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
HINT = "set MNIST_MIRROR to a URL or directory holding the four .gz files"


def env_number(name, default, cast, minimum, allowed):
    try:
        value = cast(os.environ.get(name, default))
    except ValueError:
        value = None
    if value is None or not minimum <= value < float("inf"):  # also refuses nan
        raise PipelineError(f"{name} must be {allowed}, got {os.environ[name]!r}")
    return value


def sources():
    """The mirror base URLs to try, in order: MNIST_MIRROR alone if it is set."""
    mirror = os.environ.get("MNIST_MIRROR", "").strip()
    if not mirror:
        return list(PUBLIC_MIRRORS)
    if "://" not in mirror:
        path = Path(mirror).expanduser().resolve()
        if not path.is_dir():
            raise PipelineError(f"MNIST_MIRROR={mirror}: no such directory; {HINT}")
        mirror = path.as_uri()
    return [mirror.rstrip("/") + "/"]


def fetch(url, dest, limit, timeout):
    """Stream url into dest, refusing more than `limit` bytes so a hostile mirror cannot fill the disk."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
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


def verify(path, name):
    """Check the decompressed payload's size and SHA-256 against the pinned values."""
    digest, size = FILES[name]
    sha, n = hashlib.sha256(), 0
    try:
        with gzip.open(path) as f:
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


def download(name, dest, bases, timeout, retries):
    """Try each mirror in turn; retry transient failures, move on at once from bad content."""
    failures = []
    limit = FILES[name][1] + FILES[name][1] // 100 + 65536  # gzip never grows data by more
    for base in bases:
        url = f"{base}{name}.gz"
        for attempt in range(retries + 1):
            try:
                fetch(url, dest, limit, timeout)
                verify(dest, name)
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
    raise PipelineError(f"could not get {name}.gz; tried " + "; ".join(failures) + f". {HINT}")


def main():
    # seconds a mirror may stay silent (0 would mean non-blocking sockets, so at least 1 ms)
    timeout = env_number("MNIST_TIMEOUT", 30, float, 0.001, "a positive number of seconds")
    retries = env_number("MNIST_RETRIES", 2, int, 0, "a non-negative integer")
    bases = sources()
    with tempfile.TemporaryDirectory() as scratch, atomic_path(OUT) as staged:
        staged.mkdir()
        for name in FILES:
            dest = Path(scratch) / f"{name}.gz"
            download(name, dest, bases, timeout, retries)
            shutil.move(dest, staged / dest.name)  # only verified files ever reach data/
    print(f"download: {len(FILES)} files verified in {OUT}")


if __name__ == "__main__":
    run(main)
