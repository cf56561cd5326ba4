"""Full-precision weights by name (the ``ewgs_weights`` hook), fetched into torch's hub
cache and checked against their SHA-256 before anything reads them.

A name maps to a ``PublishedWeights``: the file's URL and its SHA-256 (the whole digest,
or its first hex digits, at least 8, as published file names such as
``resnet20-12fca82f.th`` carry them and as ``torch.hub``'s ``check_hash`` reads them).
Calling it gives the local file: ``cache_dir() / <file name of the URL>``, used as it is
when its checksum matches (no network needed), downloaded otherwise. A download goes
to a temporary file in the cache folder, renamed into place only once complete and
verified, so a damaged or partial file is never kept, and never loaded.

Every failure (no network, a partial download, a checksum mismatch) is one line: what
failed, the URL, and where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from .errors import ConfigError
from .registry import registry

#: what ``fetch`` opens a URL with (``urllib.request.urlopen`` takes file:// URLs too)
Opener = Callable[[str], Any]

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where named weights are kept: torch's hub cache, ``torch.hub.get_dir()/checkpoints``
    (``$TORCH_HOME/hub/checkpoints``; ``~/.cache/torch/hub/checkpoints`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    """The SHA-256 of the file ``path``, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(digest: str, expected: str) -> bool:
    return digest.startswith(expected.lower())


@dataclass(frozen=True)
class PublishedWeights:
    """Full-precision weights published at ``url``, whose SHA-256 is ``sha256`` (the
    whole hex digest, or its first 8 or more hex digits). ``model`` names the registered
    model they fit. Called, it returns the verified local file (see ``fetch``)."""

    url: str
    sha256: str
    model: str = ""

    def __post_init__(self) -> None:
        if not (
            8 <= len(self.sha256) <= 64 and all(c in "0123456789abcdefABCDEF" for c in self.sha256)
        ):
            raise ValueError(f"sha256 must be 8 to 64 hex digits, got {self.sha256!r}")
        if not self.file_name:
            raise ValueError(f"the URL names no file: {self.url!r}")

    @property
    def file_name(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    def __call__(self) -> Path:
        return fetch(self.url, self.sha256)


def _by_hand(url: str, target: Path) -> str:
    return f"download {url} by hand and put it at {target}"


def fetch(
    url: str,
    sha256: str,
    *,
    folder: Path | None = None,
    opener: Opener = urllib.request.urlopen,
    progress: bool = True,
    key_path: str = "model.weights",
) -> Path:
    """The file of ``url`` in ``folder`` (default ``cache_dir()``), verified against
    ``sha256`` (a whole hex digest or a prefix of it). A file already there is checked
    and used without the network; otherwise it is downloaded with a progress bar (on
    stderr) through ``opener``. A failure is a ``ConfigError`` at ``key_path``, one line."""
    folder = cache_dir() if folder is None else Path(folder)
    target = folder / os.path.basename(urlparse(url).path)
    if target.is_file():
        digest = sha256_of(target)
        if _matches(digest, sha256):
            return target
        raise ConfigError(
            key_path,
            f"checksum mismatch: {target} has SHA-256 {digest[:16]}…, expected "
            f"{sha256[:16]}… (a damaged or different file; it was not loaded); delete it "
            f"to download it again, or {_by_hand(url, target)}",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".partial", dir=folder
        )
    except OSError as error:
        raise ConfigError(
            key_path, f"cannot write to {folder}: {error}; {_by_hand(url, target)}"
        ) from None
    partial = Path(temporary)
    try:
        with os.fdopen(handle, "wb") as out:
            digest = _download(url, out, opener, progress, key_path, target)
        if not _matches(digest, sha256):
            raise ConfigError(
                key_path,
                f"checksum mismatch: the file downloaded from {url} has SHA-256 "
                f"{digest[:16]}…, expected {sha256[:16]}… (damaged in transit or changed "
                f"at the source; nothing was kept); {_by_hand(url, target)} once checked",
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _download(
    url: str, out: IO[bytes], opener: Opener, progress: bool, key_path: str, target: Path
) -> str:
    """Copy ``url`` into ``out``; the SHA-256 of what was written. A short read (fewer
    bytes than the server announced) is a partial download."""
    digest = hashlib.sha256()
    written = 0
    try:
        with opener(url) as response:
            length = response.headers.get("Content-Length") if response.headers else None
            total = int(length) if length is not None and str(length).isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=target.name,
                disable=not progress,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except http.client.IncompleteRead as error:
        got = written + len(error.partial)
        raise ConfigError(key_path, _partial(url, got, target)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise ConfigError(
            key_path,
            f"cannot download {url} ({type(error).__name__}: {str(reason).strip()[:200]}); "
            f"with no network, download it elsewhere and put it at {target}",
        ) from None
    if total is not None and written != total:
        raise ConfigError(key_path, _partial(url, written, target, total))
    return digest.hexdigest()


def _partial(url: str, got: int, target: Path, total: int | None = None) -> str:
    of = f" of {total}" if total is not None else ""
    return (
        f"partial download: {got}{of} bytes of {url} arrived (the connection broke; "
        f"nothing was kept); run again, or {_by_hand(url, target)}"
    )


# --------------------------------------------------------------------- by name or file


def is_registered(value: str) -> bool:
    """Whether ``value`` is a registered weights name (``ewgs plugins`` lists them)."""
    return value in registry().entries("weights")


def check(value: str, key_path: str = "model.weights") -> None:
    """Without downloading: ``value`` is a registered name or an existing file (a
    ``ConfigError`` at ``key_path`` otherwise, naming the registered names)."""
    if is_registered(value) or Path(value).is_file():
        return
    known = ", ".join(registry().names("weights")) or "none"
    raise ConfigError(
        key_path,
        f"file not found: {value} (expected a local file of full-precision weights, a "
        f"state_dict saved with torch.save, or a registered weights name: {known})",
    )


def describe(value: str) -> str:
    """Where the weights ``value`` come from, without downloading (``--dry-run``)."""
    if not is_registered(value):
        return f"{value}: the local file"
    published = registry().get("weights", value, "model.weights").factory
    if not isinstance(published, PublishedWeights):
        return f"{value}: from the plugin that registers it"
    target = cache_dir() / published.file_name
    if target.is_file():
        return f"{value}: {target} (in the cache; its checksum is checked when it loads)"
    return f"{value}: downloaded on first use from {published.url} into {target}"


def resolve(value: str | Path, key_path: str = "model.weights") -> Path:
    """The local file of ``value``: a registered name's verified file (downloaded into
    ``cache_dir()`` if not there yet), or the file ``value`` itself."""
    text = str(value)
    if isinstance(value, str) and is_registered(text):
        entry = registry().get("weights", text, key_path)
        published = entry.factory
        if isinstance(published, PublishedWeights):
            return fetch(published.url, published.sha256, key_path=key_path)
        return Path(published())
    check(text, key_path)
    return Path(text)
