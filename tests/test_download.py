"""The downloader against a local HTTP server (127.0.0.1) serving fake files: good, truncated, corrupted, resumed."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tta.data import cifar_c, download
from tta.data.cifar_c import cifar_c_stream
from tta.data.download import RemoteFile, extract, fetch
from tta.errors import ConfigError, DownloadError

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
MD5 = f"md5:{hashlib.md5(PAYLOAD).hexdigest()}"


class Server:
    """Serves ``routes`` (path -> (bytes, mode)); records every request's path and Range header.

    Modes: ``ok`` honours Range; ``no-range`` always sends the whole file; ``cut`` announces the full length but
    closes the connection halfway.
    """

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, mode = server.routes[self.path]
                start = 0
                header = self.headers.get("Range")
                if header and mode != "no-range":
                    start = int(header.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:] if mode != "cut" else body[start:start + (len(body) - start) // 2])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def remote(server: Server, *paths: str, checksum: str | None = MD5, name: str = "file.bin") -> RemoteFile:
    return RemoteFile(name, checksum, tuple(f"{server.url}{p}" for p in paths))


def test_download_is_verified_and_renamed(server: Server, tmp_path: Path) -> None:
    server.routes["/a"] = (PAYLOAD, "ok")
    path = fetch(remote(server, "/a"), tmp_path, progress=False)
    assert path == tmp_path / "file.bin" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "file.bin.part").exists()
    fetch(remote(server, "/a"), tmp_path, progress=False)  # already there: no second request
    assert len(server.requests) == 1


def test_partial_file_is_resumed_with_a_range_request(server: Server, tmp_path: Path) -> None:
    server.routes["/a"] = (PAYLOAD, "ok")
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:123_456])
    assert fetch(remote(server, "/a"), tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.requests == [("/a", "bytes=123456-")]


def test_server_without_range_support_starts_over(server: Server, tmp_path: Path) -> None:
    server.routes["/a"] = (PAYLOAD, "no-range")
    (tmp_path / "file.bin.part").write_bytes(b"x" * 1000)  # garbage that must not end up in the file
    assert fetch(remote(server, "/a"), tmp_path, progress=False).read_bytes() == PAYLOAD


def test_complete_partial_file_is_verified_without_downloading_again(server: Server, tmp_path: Path) -> None:
    server.routes["/a"] = (PAYLOAD, "ok")
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)
    assert fetch(remote(server, "/a"), tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.requests == [("/a", f"bytes={len(PAYLOAD)}-")]  # answered 416: nothing left to send


def test_connection_cut_midway_is_resumed_from_the_next_mirror(server: Server, tmp_path: Path) -> None:
    server.routes["/cut"] = (PAYLOAD, "cut")
    server.routes["/good"] = (PAYLOAD, "ok")
    assert fetch(remote(server, "/cut", "/good"), tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.requests[0] == ("/cut", None)
    assert server.requests[1] == ("/cut", f"bytes={len(PAYLOAD) // 2}-")  # resumed, cut again
    assert server.requests[2][0] == "/good" and server.requests[2][1] is not None  # resumed once more


@pytest.mark.parametrize("bad", [PAYLOAD[:-1000], PAYLOAD[:5000] + b"\x00" + PAYLOAD[5001:]],
                         ids=["truncated", "corrupted"])
def test_bad_file_is_refetched_then_next_mirror_never_loaded(server: Server, tmp_path: Path, bad: bytes) -> None:
    server.routes["/bad"] = (bad, "ok")
    server.routes["/good"] = (PAYLOAD, "ok")
    assert fetch(remote(server, "/bad", "/good"), tmp_path, progress=False).read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/bad", "/bad", "/good"]  # re-fetched once, then the next mirror


def test_every_mirror_bad_is_a_download_error_and_no_file(server: Server, tmp_path: Path) -> None:
    server.routes["/bad"] = (PAYLOAD[::-1], "ok")
    with pytest.raises(DownloadError) as info:
        fetch(remote(server, "/bad", "/missing"), tmp_path, progress=False)
    message = str(info.value)
    for part in ("file.bin", "failed its size/checksum check", "HTTPError", f"{server.url}/bad", MD5,
                 str(tmp_path / "file.bin")):
        assert part in message
    assert not (tmp_path / "file.bin").exists() and not (tmp_path / "file.bin.part").exists()


def test_offline_says_what_to_fetch_and_where(tmp_path: Path) -> None:
    unreachable = RemoteFile("CIFAR-10-C.tar", "md5:56bf5dcef84df0e2308c6dcbcbbd8499",
                             ("http://127.0.0.1:9/CIFAR-10-C.tar",))  # port 9 (discard): connection refused
    with pytest.raises(DownloadError, match=r"URLError.*fetch it from http://127.0.0.1:9/CIFAR-10-C.tar \(checksum "
                                            r"md5:56bf.*\) and save it as .*CIFAR-10-C.tar"):
        fetch(unreachable, tmp_path, progress=False)


def test_extra_mirrors_from_the_environment(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.routes["/lab/file.bin"] = (PAYLOAD, "ok")
    monkeypatch.setenv("TTA_MIRRORS", f"http://127.0.0.1:9 {server.url}/lab/")
    assert fetch(remote(server, "/missing"), tmp_path, progress=False).read_bytes() == PAYLOAD


def test_sha256_and_bad_checksum_spec(server: Server, tmp_path: Path) -> None:
    server.routes["/a"] = (PAYLOAD, "ok")
    sha = f"sha256:{hashlib.sha256(PAYLOAD).hexdigest()}"
    assert fetch(remote(server, "/a", checksum=sha), tmp_path, progress=False).read_bytes() == PAYLOAD
    with pytest.raises(ConfigError, match="must be 'md5:<hex>' or 'sha256:<hex>'"):
        RemoteFile("x", "crc32:1234", ())


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extract_reroots_members_and_refuses_unsafe_paths(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(_tar({"noise/gaussian_noise/1/n0/x.JPEG": b"1", "noise/README": b"2"}))
    extract(tmp_path / "a.tar", tmp_path / "out", keep=lambda part: part == "gaussian_noise")
    assert (tmp_path / "out/gaussian_noise/1/n0/x.JPEG").read_bytes() == b"1"
    assert not (tmp_path / "out/README").exists() and not (tmp_path / "out/noise").exists()
    (tmp_path / "evil.tar").write_bytes(_tar({"../escape.txt": b"!"}))
    with pytest.raises(DownloadError, match="could not be extracted"):
        extract(tmp_path / "evil.tar", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_cifar10c_downloads_through_the_downloader(server: Server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def npy(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    rng = np.random.default_rng(1)
    archive = _tar({"CIFAR-10-C/labels.npy": npy(np.tile(rng.integers(0, 10, 4, dtype=np.uint8), 5)),
                    "CIFAR-10-C/fog.npy": npy(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))})
    server.routes["/cut"] = (archive, "cut")
    server.routes["/zenodo"] = (archive, "ok")
    checksum = f"md5:{hashlib.md5(archive).hexdigest()}"
    monkeypatch.setitem(download.FILES, "CIFAR-10-C.tar", remote(server, "/cut", "/zenodo", checksum=checksum,
                                                                   name="CIFAR-10-C.tar"))
    stream = cifar_c_stream("cifar10c", tmp_path / "data", ["fog"], [2], batch_size=4)
    [batch] = list(stream)
    assert batch.x.shape == (4, 3, 32, 32)
    assert (tmp_path / "data/CIFAR-10-C.tar").is_file()
    assert cifar_c.download_cifar_c.__module__ == "tta.data.cifar_c"


@pytest.mark.parametrize("served", ["checkpoint", "html"])
def test_robustbench_weights_come_through_the_downloader(server: Server, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, served: str) -> None:
    import torch

    from tta.models import zoo

    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}}, buf)
    body = buf.getvalue() if served == "checkpoint" else b"<!DOCTYPE html><title>Quota exceeded</title>"
    server.routes["/drive"] = (body, "ok")
    monkeypatch.setattr(zoo, "gdrive_url", lambda file_id: f"{server.url}/drive")
    target = tmp_path / "cifar10" / "corruptions" / "Standard.pt"
    if served == "html":
        with pytest.raises(DownloadError, match="not a PyTorch checkpoint"):
            zoo.fetch_robustbench_weights("Standard", "cifar10", tmp_path, progress=False)
        assert not target.exists()
    else:
        zoo.fetch_robustbench_weights("Standard", "cifar10", tmp_path, progress=False)
        assert target.read_bytes() == body
