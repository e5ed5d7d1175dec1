"""Explicit, checksum-verified downloads (``robustopt download NAME``). Never called implicitly.

Each file is fetched to a temporary name, its MD5 compared with the published value, and only
then renamed into place. The CIFAR-10 and CIFAR-100 archives are unpacked with tarfile's ``data`` filter, which
refuses absolute paths, links out of the tree and special files.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from robustopt.data.locations import cache_dir
from robustopt.errors import DataError


@dataclass(frozen=True)
class Remote:
    url: str
    md5: str
    filename: str


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

SOURCES: dict[str, list[Remote]] = {
    "mnist": [
        Remote(_MNIST + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "train-images-idx3-ubyte.gz"),
        Remote(_MNIST + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "train-labels-idx1-ubyte.gz"),
        Remote(_MNIST + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "t10k-images-idx3-ubyte.gz"),
        Remote(_MNIST + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "t10k-labels-idx1-ubyte.gz"),
    ],
    "fashion-mnist": [
        Remote(_FASHION + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "train-images-idx3-ubyte.gz"),
        Remote(_FASHION + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "train-labels-idx1-ubyte.gz"),
        Remote(_FASHION + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "t10k-images-idx3-ubyte.gz"),
        Remote(_FASHION + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "t10k-labels-idx1-ubyte.gz"),
    ],
    "cifar10": [
        Remote(
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
            "cifar-10-binary.tar.gz",
        ),
    ],
    "cifar100": [
        Remote(
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
            "03b5dce01913d631647c71ecec9e9cb8",
            "cifar-100-binary.tar.gz",
        ),
    ],
}


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(remote: Remote, dest_dir: Path, timeout: float = 60.0) -> Path:
    """Download one file and verify its MD5 before it gets its final name."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / remote.filename
    if target.is_file() and md5_file(target) == remote.md5:  # is_file: never hash a FIFO or a device
        return target
    with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=f".{remote.filename}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(remote.url, timeout=timeout) as resp:  # noqa: S310 - fixed https URLs
                shutil.copyfileobj(resp, tmp)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            Path(tmp.name).unlink(missing_ok=True)
            raise DataError(f"could not download {remote.url}: {e}") from None
        except BaseException:  # Ctrl-C: no partial file is left behind
            Path(tmp.name).unlink(missing_ok=True)
            raise
    got = md5_file(Path(tmp.name))
    if got != remote.md5:
        Path(tmp.name).unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {remote.url}: got md5 {got}, expected {remote.md5}; nothing was saved")
    Path(tmp.name).replace(target)
    return target


def download(name: str, dest: Path | None = None, sources: dict[str, list[Remote]] | None = None) -> Path:
    """Fetch dataset ``name`` into ``dest`` (default: the user cache) and return its directory."""
    table = SOURCES if sources is None else sources
    if name not in table:
        raise DataError(f"unknown dataset {name!r}: downloadable ones are {', '.join(table)}")
    root = dest or cache_dir()
    if root.exists() and not root.is_dir():
        raise DataError(f"--dest {root} is a file, not a directory; choose another --dest")
    target = root / name
    paths = [fetch(r, target) for r in table[name]]
    for p in paths:
        if p.name.endswith(".tar.gz"):
            try:
                with tarfile.open(p) as tar:
                    tar.extractall(root, filter="data")
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"could not unpack {p}: {e}") from None
    return target
