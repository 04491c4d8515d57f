"""One downloader for every file ``tta`` fetches: datasets (CIFAR-10-C, CIFAR-100-C, ImageNet-C) and model weights.

A ``RemoteFile`` names a file, its published checksum and its mirrors (Zenodo first). ``fetch`` downloads it to
``<name>.part`` beside its final path, resuming a partial ``.part`` with an HTTP ``Range`` request, shows a progress
bar, checks the size and the checksum, and only then renames it to its final name: a file under its final name has
always been verified, and a truncated or corrupted download is deleted and fetched again (once per mirror), never
loaded. When every mirror fails, a ``DownloadError`` says what to fetch, from where, and where to put it.

Extra mirrors (e.g. a lab's file server) come from the ``TTA_MIRRORS`` environment variable: space-separated base
URLs, tried after the published ones, each serving ``<base>/<file name>``.

Checksums, and where they are published:

- ``CIFAR-10-C.tar`` and ``CIFAR-100-C.tar``: the md5s of Zenodo records 2535967 and 3555552 (the records' file
  listings; robustbench's downloader checks the same values, read from Zenodo's API).
- ImageNet-C's five archives (Zenodo record 2235448): the md5s listed in public dataset wrappers of ImageNet-C
  (the same list in more than one open-source repository); we could not read them from Zenodo itself here.
- robustbench's model weights: robustbench publishes none, so they are checked by loading them as a PyTorch
  checkpoint (see ``tta.models.zoo``) instead of by checksum.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tta.errors import ConfigError, DownloadError

CHUNK = 1 << 20
TIMEOUT = 30.0  # seconds without progress before a mirror counts as unreachable


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: its name, checksum (``md5:<hex>`` or ``sha256:<hex>``, or None), size and mirrors."""

    name: str
    checksum: str | None
    urls: tuple[str, ...]
    size: int | None = None
    note: str = field(default="", compare=False)  # where the checksum comes from, for error messages

    def __post_init__(self) -> None:
        if self.checksum is not None:
            algo, _, digest = self.checksum.partition(":")
            if algo not in ("md5", "sha256") or not digest:
                raise ConfigError(f"checksum {self.checksum!r} of {self.name} must be 'md5:<hex>' or 'sha256:<hex>'")

    def mirrors(self) -> list[str]:
        """The published URLs, then ``<base>/<name>`` for every base URL in ``TTA_MIRRORS``."""
        extra = [f"{base.rstrip('/')}/{self.name}" for base in os.environ.get("TTA_MIRRORS", "").split() if base]
        return [*self.urls, *extra]


def _zenodo(record: str, name: str) -> tuple[str, str]:
    """The two Zenodo URLs of a record's file: the record's download link, then the API's content link."""
    return (f"https://zenodo.org/records/{record}/files/{name}?download=1",
            f"https://zenodo.org/api/records/{record}/files/{name}/content")


FILES: dict[str, RemoteFile] = {
    f.name: f for f in (
        RemoteFile("CIFAR-10-C.tar", "md5:56bf5dcef84df0e2308c6dcbcbbd8499", _zenodo("2535967", "CIFAR-10-C.tar")),
        RemoteFile("CIFAR-100-C.tar", "md5:11f0ed0f1191edbf9fa23466ae6021d3", _zenodo("3555552", "CIFAR-100-C.tar")),
        RemoteFile("blur.tar", "md5:2d8e81fdd8e07fef67b9334fa635e45c", _zenodo("2235448", "blur.tar")),
        RemoteFile("digital.tar", "md5:89157860d7b10d5797849337ca2e5c03", _zenodo("2235448", "digital.tar")),
        RemoteFile("extra.tar", "md5:d492dfba5fc162d8ec2c3cd8ee672984", _zenodo("2235448", "extra.tar")),
        RemoteFile("noise.tar", "md5:e80562d7f6c3f8834afb1ecf27252745", _zenodo("2235448", "noise.tar")),
        RemoteFile("weather.tar", "md5:33ffea4db4d93fe4a428c40a6ce0c25d", _zenodo("2235448", "weather.tar")),
    )
}


def file_checksum(path: str | Path, algo: str = "md5") -> str:
    """The hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, remote: RemoteFile) -> bool:
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    if remote.checksum is None:
        return True
    algo, _, expected = remote.checksum.partition(":")
    return file_checksum(path, algo) == expected.lower()


def _open(url: str, offset: int) -> tuple[http.client.HTTPResponse | None, int, int | None]:
    """Open ``url`` from byte ``offset``: (response, offset it really starts at, total size if known)."""
    request = urllib.request.Request(url, headers={"User-Agent": "tta-downloader"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the partial file is already complete (or longer than the file)
            return None, offset, None
        raise
    length = response.headers.get("Content-Length")
    if offset and response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return response, offset, int(total) if total.isdigit() else None
    return response, 0, int(length) if length and length.isdigit() else None  # server ignored Range: start over


def _download(url: str, part: Path, progress: bool) -> None:
    """Append ``url``'s bytes to ``part`` from its current size (a fresh download if the server cannot resume)."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    response, start, total = _open(url, offset)
    if response is None:
        return
    with response, open(part, "ab" if start else "wb") as out, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part"),
        disable=not progress, leave=False,
    ) as bar:
        while chunk := response.read(CHUNK):
            out.write(chunk)
            bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"the connection closed after {part.stat().st_size} of {total} bytes")


def fetch(remote: RemoteFile, directory: str | Path, progress: bool = True) -> Path:
    """``directory/<remote.name>``, downloaded and verified unless it is already there (see the module docs).

    A file already under its final name was verified when it was put there and is not hashed again. Each mirror is
    tried twice in turn; a partial ``.part`` (from an earlier run or a dropped connection) is resumed; a complete
    download that fails its check is deleted before the next attempt.
    """
    directory = Path(directory)
    target = directory / remote.name
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    errors: list[str] = []
    for url in remote.mirrors():
        for _attempt in range(2):
            try:
                _download(url, part, progress)
            except (OSError, http.client.HTTPException, ValueError) as err:  # HTTP, socket, DNS, timeout, cut off
                errors.append(f"{url}: {type(err).__name__}: {err}")
                continue  # keep the partial file: the next attempt (or mirror) resumes it
            if _matches(part, remote):
                part.replace(target)
                return target
            got = part.stat().st_size
            part.unlink()
            errors.append(f"{url}: the downloaded file ({got} bytes) failed its "
                          f"{'size/checksum' if remote.checksum else 'size'} check and was deleted")
    raise DownloadError(
        f"could not download {remote.name} ({'; '.join(errors[-3:]) or 'no mirror'}); fetch it from "
        f"{remote.mirrors()[0] if remote.mirrors() else 'its publisher'}"
        f"{f' (checksum {remote.checksum})' if remote.checksum else ''} and save it as {target}"
    )


def _strip_to(members: Sequence[tarfile.TarInfo], keep: Callable[[str], bool] | None) -> list[tarfile.TarInfo]:
    """Members with leading folders removed until their first folder satisfies ``keep`` (others are skipped)."""
    if keep is None:
        return list(members)
    out = []
    for member in members:
        parts = Path(member.name).parts
        for i, part in enumerate(parts):
            if keep(part):
                member.name = str(Path(*parts[i:]))
                out.append(member)
                break
    return out


def extract(archive: str | Path, into: str | Path, keep: Callable[[str], bool] | None = None) -> None:
    """Extract a tar archive into ``into`` (unsafe paths refused); ``keep`` re-roots members, see ``_strip_to``."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = _strip_to(tar.getmembers(), keep)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:  # Python without extraction filters: refuse absolute paths and '..' ourselves
                for m in members:
                    if Path(m.name).is_absolute() or ".." in Path(m.name).parts:
                        raise DownloadError(f"{archive} holds an unsafe path {m.name!r}; delete it and download again")
                tar.extractall(into, members=members)
    except (tarfile.TarError, EOFError) as err:
        raise DownloadError(f"{archive} could not be extracted ({err}); delete it and download it again") from None


def fetch_and_extract(name: str, data_dir: str | Path, into: str | Path | None = None,
                      keep: Callable[[str], bool] | None = None, progress: bool = True,
                      remove_archive: bool = False) -> None:
    """Fetch the archive ``name`` of ``FILES`` into ``data_dir`` and extract it into ``into`` (default ``data_dir``)."""
    if name not in FILES:
        raise ConfigError(f"no download is known for {name!r}; known files: {', '.join(FILES)}")
    archive = fetch(FILES[name], data_dir, progress)
    extract(archive, into if into is not None else data_dir, keep)
    if remove_archive:
        archive.unlink()

