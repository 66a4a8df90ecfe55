"""``voco download`` against a real HTTP server on 127.0.0.1 (http.server in a thread).

The handler serves registered files with HTTP Range support and can inject failures: HTTP 500s, a truncated body
(Content-Length promises more than is sent), a server that ignores Range, a redirect to another host name. It also
serves a Hugging Face style tree listing (``/api/datasets/<repo>/tree/<rev>``) and ``resolve`` URLs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from voco.cli import main as voco_main
from voco.config import load_card
from voco.data import sources
from voco.errors import ConfigError, DownloadError

TOKEN = "hf_SECRET_token_value_123"


class Server:
    """State shared with the handler: files, failure injection, and a log of what was requested."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}  # path -> number of 500 responses still to give
        self.truncate: dict[str, int] = {}  # path -> number of truncated responses still to give
        self.ignore_range: set[str] = set()
        self.redirect: dict[str, str] = {}  # path -> absolute URL
        self.trees: dict[str, list[dict]] = {}  # tree API path -> listing
        self.requests: list[dict] = []
        self.bytes_sent: dict[str, int] = {}
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]


def _handler(state: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # keep pytest output clean
            pass

        def do_GET(self):  # noqa: N802 - http.server API
            path = self.path.split("?")[0]
            state.requests.append(
                {
                    "path": path,
                    "range": self.headers.get("Range"),
                    "auth": self.headers.get("Authorization"),
                    "host": self.headers.get("Host"),
                }
            )
            if path in state.redirect:
                self.send_response(302)
                self.send_header("Location", state.redirect[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if state.fail.get(path, 0) > 0:
                state.fail[path] -= 1
                self._send(500, b"boom")
                return
            if path in state.trees:
                self._send(200, json.dumps(state.trees[path]).encode(), ctype="application/json")
                return
            if path not in state.files:
                self._send(404, b"not found")
                return
            data = state.files[path]
            start = 0
            rng = self.headers.get("Range")
            if rng and path not in state.ignore_range:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.truncate.get(path, 0) > 0:
                state.truncate[path] -= 1
                body = body[: len(body) // 2]
                self.close_connection = True
            self.wfile.write(body)
            self.wfile.flush()
            state.bytes_sent[path] = state.bytes_sent.get(path, 0) + len(body)

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server():
    state = Server()
    state.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    t = threading.Thread(target=state.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield state
    state.httpd.shutdown()
    state.httpd.server_close()


def settings(**kw) -> sources.Settings:
    base = {"retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5, "progress": False}
    base.update(kw)
    return sources.Settings(**base)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def payload(n: int = 300_000, seed: int = 1) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def tar_bytes(members: dict[str, bytes], top: str | None = "Task09_Demo") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def http_card(url: str, sha256: str | None = None, **extra) -> dict:
    src = {"kind": "http", "url": url}
    if sha256:
        src["sha256"] = sha256
    src.update(extra)
    return {"id": "demo", "region": "abdomen", "source": src}


# ------------------------------------------------------------------------------------------------- http files


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    data = payload()
    server.files["/a.bin"] = data
    dest = tmp_path / "dl" / "a.bin"
    remote = sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", sha256="0" * 64)
    with pytest.raises(DownloadError, match=r"checksum mismatch for a\.bin"):
        sources.fetch(remote, dest, settings())
    assert not dest.exists()
    assert not dest.with_name("a.bin.part").exists()


def test_truncated_transfer_is_resumed(server, tmp_path):
    data = payload()
    server.files["/a.bin"] = data
    server.truncate["/a.bin"] = 1
    dest = tmp_path / "a.bin"
    rec = sources.fetch(
        sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", sha256=sha(data)), dest, settings()
    )
    assert dest.read_bytes() == data
    assert rec["sha256"] == sha(data) and rec["verified"] == ["sha256"]
    ranges = [r["range"] for r in server.requests]
    assert ranges[0] is None and ranges[1] == f"bytes={len(data) // 2}-"
    assert server.bytes_sent["/a.bin"] == len(data)  # nothing sent twice


def test_http_500_twice_then_ok(server, tmp_path):
    data = payload(5000)
    server.files["/a.bin"] = data
    server.fail["/a.bin"] = 2
    dest = tmp_path / "a.bin"
    sources.fetch(sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", sha256=sha(data)), dest, settings())
    assert dest.read_bytes() == data
    assert len(server.requests) == 3


def test_http_500_forever_gives_up(server, tmp_path):
    server.files["/a.bin"] = b"x"
    server.fail["/a.bin"] = 100
    with pytest.raises(DownloadError, match="giving up after 3 attempts"):
        sources.fetch(
            sources.RemoteFile(url=server.base + "/a.bin", name="a.bin"), tmp_path / "a.bin", settings(retries=2)
        )
    assert not (tmp_path / "a.bin").exists()


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        sources.fetch(sources.RemoteFile(url=server.base + "/nope.bin", name="nope.bin"), tmp_path / "n", settings())
    assert len(server.requests) == 1


def test_resume_from_partial_file(server, tmp_path):
    data = payload()
    server.files["/a.bin"] = data
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(data[:100_000])
    sources.fetch(sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", sha256=sha(data)), dest, settings())
    assert dest.read_bytes() == data
    assert server.requests[0]["range"] == "bytes=100000-"
    assert server.bytes_sent["/a.bin"] == len(data) - 100_000


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = payload(50_000)
    server.files["/a.bin"] = data
    server.ignore_range.add("/a.bin")
    (tmp_path / "a.bin.part").write_bytes(b"garbage" * 10)
    sources.fetch(
        sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", sha256=sha(data)), tmp_path / "a.bin", settings()
    )
    assert (tmp_path / "a.bin").read_bytes() == data


def test_existing_verified_file_is_not_downloaded_again(server, tmp_path):
    data = payload(1000)
    (tmp_path / "a.bin").write_bytes(data)
    sources.fetch(
        sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", sha256=sha(data)), tmp_path / "a.bin", settings()
    )
    assert server.requests == []


def test_http_archive_dataset_end_to_end(server, tmp_path):
    members = {"dataset.json": b'{"name": "demo"}', "imagesTr/c1.nii.gz": payload(2000), "labelsTr/c1.nii.gz": b"lbl"}
    archive = tar_bytes(members)
    server.files["/Task09_Demo.tar.gz"] = archive
    out = tmp_path / "raw" / "demo"
    doc = sources.download_dataset(http_card(server.base + "/Task09_Demo.tar.gz", sha(archive)), out, settings())
    # single top-level folder flattened into out; archive removed; SOURCE.json written with the archive's sha256
    assert (out / "dataset.json").read_bytes() == members["dataset.json"]
    assert (out / "imagesTr" / "c1.nii.gz").read_bytes() == members["imagesTr/c1.nii.gz"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]  # no downloads / staging folder left beside it
    src = json.loads((out / "SOURCE.json").read_text())
    assert src == doc and src["files"][0]["sha256"] == sha(archive) and src["extracted"] == ["Task09_Demo.tar.gz"]


def test_http_without_checksum_needs_user_sha_or_flag(server, tmp_path):
    data = tar_bytes({"x.txt": b"x"}, top=None)
    server.files["/d.tar.gz"] = data
    card = http_card(server.base + "/d.tar.gz")
    with pytest.raises(DownloadError, match="--sha256"):
        sources.download_dataset(card, tmp_path / "o1", settings())
    with pytest.raises(DownloadError, match="checksum mismatch"):
        sources.download_dataset(card, tmp_path / "o2", settings(), sha256="f" * 64)
    assert not (tmp_path / "o2" / "SOURCE.json").exists()
    doc = sources.download_dataset(card, tmp_path / "o3", settings(), sha256=sha(data))
    assert doc["unverified"] == [] and (tmp_path / "o3" / "x.txt").read_bytes() == b"x"
    doc = sources.download_dataset(card, tmp_path / "o4", settings(), allow_unverified=True)
    assert doc["unverified"] == ["d.tar.gz"]


def test_md5_checksum(server, tmp_path):
    data = payload(1000)
    server.files["/a.bin"] = data
    bad = sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", md5="0" * 32)
    with pytest.raises(DownloadError, match="md5"):
        sources.fetch(bad, tmp_path / "a.bin", settings())
    good = sources.RemoteFile(url=server.base + "/a.bin", name="a.bin", md5=hashlib.md5(data).hexdigest())
    assert sources.fetch(good, tmp_path / "a.bin", settings())["verified"] == ["md5"]


def test_mirror_prefix_rewrites_url(server, tmp_path):
    data = payload(1000)
    server.files["/mirror/a.bin"] = data
    s = settings(mirrors={"https://bucket.example.org/": server.base + "/mirror/"})
    sources.fetch(
        sources.RemoteFile(url="https://bucket.example.org/a.bin", name="a.bin", sha256=sha(data)),
        tmp_path / "a.bin",
        s,
    )
    assert (tmp_path / "a.bin").read_bytes() == data


# --------------------------------------------------------------------------------------------------- archives


def _tar_with(tmp_path: Path, build) -> Path:
    p = tmp_path / "evil.tar"
    with tarfile.open(p, "w") as tf:
        build(tf)
    return p


def _add(tf, name, data=b"x", **kw):
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


@pytest.mark.parametrize(
    ("build", "member", "why"),
    [
        (lambda tf: (_add(tf, "ok.txt"), _add(tf, "../escape.txt")), "../escape.txt", "traversal"),
        (lambda tf: _add(tf, "/etc/evil.txt"), "/etc/evil.txt", "absolute"),
        (lambda tf: _add(tf, "link", type=tarfile.SYMTYPE, linkname="../../outside"), "link", "outside"),
        (lambda tf: _add(tf, "abs", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "abs", "absolute"),
        (lambda tf: _add(tf, "hard", type=tarfile.LNKTYPE, linkname="../x"), "hard", "outside|traversal"),
        (lambda tf: _add(tf, "dev", type=tarfile.CHRTYPE), "dev", "special"),
    ],
)
def test_malicious_tar_rejected(tmp_path, build, member, why):
    archive = _tar_with(tmp_path, build)
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match=why) as e:
        sources.safe_extract(archive, dest)
    assert repr(member) in str(e.value)
    assert not any(dest.rglob("*")), "nothing may be extracted from a rejected archive"
    assert not (tmp_path / "escape.txt").exists()


def test_malicious_zip_rejected(tmp_path):
    for name, why in (("../evil.txt", "traversal"), ("/abs.txt", "absolute"), ("a\\..\\..\\x.txt", "traversal")):
        p = tmp_path / "evil.zip"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("fine.txt", "ok")
            zf.writestr(zipfile.ZipInfo(name), "bad")
        with pytest.raises(DownloadError, match=why) as e:
            sources.safe_extract(p, tmp_path / "out")
        assert repr(name) in str(e.value)
        assert not (tmp_path / "out" / "fine.txt").exists()
    # a symlink member pointing out of the target
    p = tmp_path / "link.zip"
    with zipfile.ZipFile(p, "w") as zf:
        info = zipfile.ZipInfo("innocent")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "../../etc/passwd")
    with pytest.raises(DownloadError, match="'innocent'.*outside"):
        sources.safe_extract(p, tmp_path / "out")


def test_tar_internal_symlink_allowed(tmp_path):
    def build(tf):
        _add(tf, "d/real.txt", b"hi")
        _add(tf, "d/alias.txt", type=tarfile.SYMTYPE, linkname="real.txt")

    sources.safe_extract(_tar_with(tmp_path, build), tmp_path / "out")
    assert (tmp_path / "out" / "d" / "alias.txt").read_bytes() == b"hi"


def test_malicious_archive_via_download_names_member(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../pwned.txt", "bad")
    data = buf.getvalue()
    server.files["/evil.zip"] = data
    out = tmp_path / "raw" / "demo"
    with pytest.raises(DownloadError, match=r"'\.\./\.\./pwned\.txt'"):
        sources.download_dataset(http_card(server.base + "/evil.zip", sha(data)), out, settings())
    assert not (out / "SOURCE.json").exists()
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "raw" / "pwned.txt").exists()


def _zip_bomb(n: int = 8 << 20) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fine.txt", b"ok")
        zf.writestr("zeros.bin", bytes(n))
    return buf.getvalue()


def _tar_bomb(n: int = 8 << 20) -> bytes:
    return tar_bytes({"fine.txt": b"ok", "zeros.bin": bytes(n)}, top="Task_Bomb")


@pytest.mark.parametrize(("name", "make"), [("bomb.zip", _zip_bomb), ("bomb.tar.gz", _tar_bomb)])
def test_zip_and_tar_bombs_are_refused_with_nothing_left_behind(server, tmp_path, name, make):
    data = make()
    assert len(data) * 200 < 8 << 20  # compression ratio > 200
    server.files[f"/{name}"] = data
    out = tmp_path / "raw" / "demo"
    with pytest.raises(DownloadError, match=r"compression ratio over download\.max_ratio = 100"):
        sources.download_dataset(http_card(server.base + f"/{name}", sha(data)), out, settings())
    assert not out.exists()
    left = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert left == [".demo.downloads"]  # only the verified archive, kept for a resumed attempt; no staging folder
    assert [p.name for p in (tmp_path / "raw" / ".demo.downloads").iterdir()] == [name]
    # the limit is configurable: a genuine highly compressible archive goes through when the user raises it
    doc = sources.download_dataset(http_card(server.base + f"/{name}", sha(data)), out, settings(max_ratio=5000))
    assert (out / "zeros.bin").stat().st_size == 8 << 20 and doc["extracted"] == [name]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["demo"]


def test_extraction_limits_on_members_total_size_and_free_space(tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(12):
            zf.writestr(f"f{i}.txt", b"x" * 100)
    with pytest.raises(DownloadError, match="max_members = 10"):
        sources.safe_extract(many, tmp_path / "o1", settings(max_members=10))
    assert not any((tmp_path / "o1").iterdir())
    with pytest.raises(DownloadError, match="max_extract_bytes = 1000"):
        sources.safe_extract(many, tmp_path / "o2", settings(max_extract_bytes=1000))
    assert not any((tmp_path / "o2").iterdir())
    # a full disk (cannot be made here: the free-space figure is what the OS would report)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 500, 500))
    with pytest.raises(DownloadError, match="needs 1200 bytes to extract but .* has only 500 bytes free"):
        sources.safe_extract(many, tmp_path / "o3", settings())
    assert not any((tmp_path / "o3").iterdir())
    monkeypatch.undo()
    assert len(sources.safe_extract(many, tmp_path / "o4", settings())) == 12


def test_a_redownload_replaces_the_raw_folder_and_a_failure_keeps_the_old_one(server, tmp_path):
    v1 = tar_bytes({"dataset.json": b'{"v": 1}', "imagesTr/old_only.nii.gz": b"old"})
    v2 = tar_bytes({"dataset.json": b'{"v": 2}', "imagesTr/new.nii.gz": b"new"})
    server.files["/v1.tar.gz"], server.files["/v2.tar.gz"] = v1, v2
    out = tmp_path / "raw" / "demo"
    sources.download_dataset(http_card(server.base + "/v1.tar.gz", sha(v1)), out, settings())
    assert (out / "imagesTr" / "old_only.nii.gz").exists()
    sources.download_dataset(http_card(server.base + "/v2.tar.gz", sha(v2)), out, settings())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "SOURCE.json", "dataset.json", "imagesTr/new.nii.gz"]  # nothing of v1 merged in
    # a failing re-download (unsafe member) leaves the complete previous folder in place
    evil = tar_bytes({"../escape.txt": b"x"}, top=None)
    server.files["/evil.tar.gz"] = evil
    with pytest.raises(DownloadError, match="traversal"):
        sources.download_dataset(http_card(server.base + "/evil.tar.gz", sha(evil)), out, settings())
    assert json.loads((out / "dataset.json").read_text()) == {"v": 2} and (out / "SOURCE.json").exists()
    assert not list((tmp_path / "raw").glob(".demo.staging-*")) and not (tmp_path / "raw" / "escape.txt").exists()


def test_split_groups():
    names = ["b.zip.002", "b.zip.001", "b.zip.003", "x.tar.gz.part_ab", "x.tar.gz.part_aa", "readme.md"]
    assert sources.split_groups(names) == {
        "b.zip": ["b.zip.001", "b.zip.002", "b.zip.003"],
        "x.tar.gz": ["x.tar.gz.part_aa", "x.tar.gz.part_ab"],
    }
    with pytest.raises(DownloadError, match="not consecutive"):
        sources.split_groups(["b.zip.001", "b.zip.003"])


# ------------------------------------------------------------------------------- Hugging Face (huggingface_hub)
# A minimal stand-in for the hub on 127.0.0.1: the API routes and the resolve route the real library uses
# (repo info, recursive tree listing, HEAD/GET resolve with X-Repo-Commit / ETag / X-Linked-* headers and Range).


class Hub:
    """Repositories served by the fake hub, redirects to inject, and a log of every request it received."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict] = {}
        self.redirect: dict[str, str] = {}  # resolve path -> absolute URL (302, with the hub's metadata headers)
        self.cdn: dict[str, bytes] = {}  # other paths served as plain files (a CDN behind a redirect)
        self.tamper: dict[str, bytes] = {}  # resolve path -> bytes served instead of the file (metadata unchanged)
        self.requests: list[dict] = []
        self.httpd: ThreadingHTTPServer | None = None
        self.scheme = "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, repo: str, files: dict[str, bytes], lfs: set[str] = frozenset(), repo_type: str = "dataset") -> str:
        commit = hashlib.sha1(repr((repo, sorted(files.items()))).encode()).hexdigest()
        self.repos[(repo_type, repo)] = {"commit": commit, "files": files, "lfs": set(lfs)}
        return commit

    def oid(self, repo: dict, path: str) -> str:
        data = repo["files"][path]
        if path in repo["lfs"]:
            return sha(data)
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def _hub_handler(state: Hub):
    import re
    import urllib.parse

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_HEAD(self):  # noqa: N802
            self._serve(head=True)

        def do_GET(self):  # noqa: N802
            self._serve(head=False)

        def _send(self, code, body=b"", headers=None, head=False):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _repo(self, kind, repo_id, rev):
            repo = state.repos.get((kind, repo_id))
            if repo is None:
                self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
                return None
            if rev not in ("main", repo["commit"]):
                self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"})
                return None
            return repo

        def _serve(self, head):
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            state.requests.append({"method": self.command, "path": path, "auth": self.headers.get("Authorization"),
                                   "range": self.headers.get("Range")})
            if path in state.cdn:
                self._send(200, state.cdn[path], {"Content-Type": "application/octet-stream"}, head)
                return
            m = re.match(r"^/api/(dataset|model)s/([^/]+/[^/]+)/(revision|tree)/([^/]+)$", path)
            if m:
                repo = self._repo(m.group(1), m.group(2), m.group(4))
                if repo is None:
                    return
                if m.group(3) == "revision":
                    doc = {"id": m.group(2), "sha": repo["commit"],
                           "siblings": [{"rfilename": p} for p in repo["files"]]}
                else:
                    doc, dirs = [], set()
                    for p, data in repo["files"].items():
                        e = {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(p.encode()).hexdigest()}
                        if p in repo["lfs"]:
                            e["lfs"] = {"oid": sha(data), "size": len(data), "pointerSize": 134}
                        else:
                            e["oid"] = state.oid(repo, p)
                        doc.append(e)
                        dirs |= {"/".join(p.split("/")[:k]) for k in range(1, p.count("/") + 1)}
                    doc += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
                self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, head)
                return
            m = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                kind = "dataset" if m.group(1) else "model"
                repo = self._repo(kind, m.group(2), m.group(3))
                if repo is None:
                    return
                f = m.group(4)
                if f not in repo["files"]:
                    self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["commit"]}, head)
                    return
                data = repo["files"][f]
                meta = {"X-Repo-Commit": repo["commit"], "ETag": f'"{state.oid(repo, f)}"'}
                if f in repo["lfs"]:
                    meta.update({"X-Linked-Etag": f'"{sha(data)}"', "X-Linked-Size": str(len(data))})
                if path in state.redirect:
                    self._send(302, b"", {**meta, "Location": state.redirect[path]}, head)
                    return
                start, code = 0, 200
                rng = self.headers.get("Range")
                if rng and not head:
                    start, code = int(rng.split("=")[1].split("-")[0]), 206
                    meta["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = state.tamper.get(path, data)[start:]
                if head:
                    self.send_response(200)
                    for k, v in meta.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                self._send(code, body, {**meta, "Accept-Ranges": "bytes"})
                return
            self._send(404, b"not found", head=head)

    return Handler


def _serve(handler, ssl_ctx=None) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if ssl_ctx is not None:
        httpd.socket = ssl_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return httpd


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A plain-HTTP fake hub; no saved token leaks in from the machine (HF_HOME points into tmp)."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    state = Hub()
    state.httpd = _serve(_hub_handler(state))
    yield state
    state.httpd.shutdown()
    state.httpd.server_close()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 / localhost (openssl), trusted through SSL_CERT_FILE in the tests."""
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a certificate for the local HTTPS hub (apt-get install openssl)")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def https_hub(hub_server, tls_cert, monkeypatch):
    """The same fake hub over HTTPS (its certificate trusted via SSL_CERT_FILE, as a corporate CA would be)."""
    import ssl

    cert, key = tls_cert
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    state = Hub()
    state.scheme = "https"
    state.httpd = _serve(_hub_handler(state), ctx)
    yield state
    state.httpd.shutdown()
    state.httpd.server_close()


def hub_card(repo: str, revision: str | None, **src) -> dict:
    s = {"kind": "huggingface", "repo": repo, **src}
    if revision:
        s["revision"] = revision
    return {"id": "demo_hub", "region": "abdomen", "source": s}


def test_hub_split_zip_pinned_commit_parallel_verified_and_replaced_atomically(hub_server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("VoComni/imagesTr/VoComni_0_0000.nii.gz", payload(40_000, 2))
        zf.writestr("VoComni/labelsTr/VoComni_0.nii.gz", b"label")
    z = buf.getvalue()
    third = len(z) // 3
    files = {"VoComni.zip.001": z[:third], "VoComni.zip.002": z[third: 2 * third], "VoComni.zip.003": z[2 * third:],
             "README.md": b"# readme", "other/skip.bin": b"no"}
    commit = hub_server.add("Luffy503/VoComni", files, lfs={"VoComni.zip.001", "VoComni.zip.002", "VoComni.zip.003"})
    card = hub_card("Luffy503/VoComni", commit, include=["VoComni.zip.*", "README.md"])
    out = tmp_path / "raw" / "vocomni"
    out.mkdir(parents=True)
    (out / "stale_from_an_old_download.txt").write_text("old")  # a re-download must not merge into the old folder
    doc = sources.download_dataset(card, out, settings(hf_base=hub_server.base, workers=3))
    assert (out / "imagesTr" / "VoComni_0_0000.nii.gz").read_bytes() == payload(40_000, 2)
    assert (out / "README.md").read_bytes() == b"# readme"
    assert not (out / "other").exists() and not (out / "stale_from_an_old_download.txt").exists()
    assert doc["joined"] == ["VoComni.zip"] and doc["revision"] == commit and doc["requested_revision"] == commit
    assert {f["name"]: f["verified"] for f in doc["files"]} == {
        "README.md": ["git_oid"], "VoComni.zip.001": ["sha256"], "VoComni.zip.002": ["sha256"],
        "VoComni.zip.003": ["sha256"]}
    assert json.loads((out / "SOURCE.json").read_text()) == doc
    # everything was asked for at the pinned commit, through the library's resolve route; nothing left beside out
    resolves = [r for r in hub_server.requests if "/resolve/" in r["path"]]
    assert resolves and all(f"/resolve/{commit}/" in r["path"] for r in resolves)
    assert not [r for r in hub_server.requests if r["path"].endswith("/revision/main")]
    assert sorted(p.name for p in out.parent.iterdir()) == ["vocomni"]


def test_hub_unpinned_card_needs_the_flag_and_records_the_commit(hub_server, tmp_path, capsys):
    commit = hub_server.add("o/r", {"a.bin": b"payload"})
    card = hub_card("o/r", None, files=["a.bin"])
    out = tmp_path / "raw" / "r"
    with pytest.raises(ConfigError, match="--allow-unpinned"):
        sources.download_dataset(card, out, settings(hf_base=hub_server.base))
    assert hub_server.requests == [] and not out.exists()  # refused before any network access
    doc = sources.download_dataset(card, out, settings(hf_base=hub_server.base), allow_unpinned=True)
    assert doc["revision"] == commit and doc["requested_revision"] == "main"
    assert (out / "a.bin").read_bytes() == b"payload"


def test_hub_checksum_mismatch_leaves_nothing_and_keeps_the_old_folder(hub_server, tmp_path):
    commit = hub_server.add("o/r", {"a.bin": b"payload"}, lfs={"a.bin"})
    out = tmp_path / "raw" / "r"
    out.mkdir(parents=True)
    (out / "SOURCE.json").write_text('{"old": true}')
    # the card's own sha256 disagrees with the hub's: refused before downloading
    bad_card = hub_card("o/r", commit, files=["a.bin"], checksums={"a.bin": "0" * 64})
    with pytest.raises(DownloadError, match="differs from the hub's"):
        sources.download_dataset(bad_card, out, settings(hf_base=hub_server.base))
    # the hub serves other bytes (same size) than its listing says: our own sha256 check catches it
    hub_server.tamper[f"/datasets/o/r/resolve/{commit}/a.bin"] = b"PAYLOAD"
    with pytest.raises(DownloadError, match="checksum mismatch for a.bin"):
        sources.download_dataset(hub_card("o/r", commit, files=["a.bin"]), out, settings(hf_base=hub_server.base))
    assert json.loads((out / "SOURCE.json").read_text()) == {"old": True}  # the previous folder is untouched
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".downloads")) == ["r"]
    assert not [p for p in out.parent.rglob("a.bin")]


def test_hub_missing_file_and_empty_match(hub_server):
    commit = hub_server.add("o/r", {"a.bin": b"payload"})
    with pytest.raises(DownloadError, match="b.bin"):
        sources.plan_hub(hub_card("o/r", commit, files=["b.bin"]), settings(hf_base=hub_server.base))
    with pytest.raises(DownloadError, match="--list"):
        sources.plan_hub(hub_card("o/r", commit, include=["nothing/*"]), settings(hf_base=hub_server.base))
    with pytest.raises(DownloadError, match="RepositoryNotFound|RepoNotFound|no such repository"):
        sources.plan_hub(hub_card("o/missing", commit, files=["a.bin"]), settings(hf_base=hub_server.base))


def test_hf_endpoint_environment_is_honoured(hub_server, tmp_path, monkeypatch):
    commit = hub_server.add("o/r", {"a.bin": b"payload"})
    monkeypatch.setenv("HF_ENDPOINT", hub_server.base)
    doc = sources.download_dataset(hub_card("o/r", commit, files=["a.bin"]), tmp_path / "raw" / "r", settings())
    assert doc["endpoint"] == hub_server.base and (tmp_path / "raw" / "r" / "a.bin").read_bytes() == b"payload"


def test_a_mirror_over_http_never_receives_the_token(hub_server, tmp_path, monkeypatch):
    """Env token and saved token, a mirror endpoint even listed among token_hosts: plain HTTP gets no credentials."""
    import huggingface_hub.constants as hc

    Path(hc.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(hc.HF_TOKEN_PATH).write_text("hf_saved_token_value")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    commit = hub_server.add("o/r", {"a.bin": b"payload", "b.bin": payload(5000)}, lfs={"b.bin"})
    s = settings(hf_base=hub_server.base, token_hosts=["huggingface.co", "127.0.0.1"])
    sources.download_dataset(hub_card("o/r", None, files=["a.bin", "b.bin"]), tmp_path / "raw" / "r", s,
                             allow_unpinned=True)
    assert len(hub_server.requests) >= 4 and all(r["auth"] is None for r in hub_server.requests)
    # the same through HF_ENDPOINT and the saved token only
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.base)
    hub_server.requests.clear()
    sources.download_dataset(hub_card("o/r", commit, files=["a.bin"]), tmp_path / "raw" / "r2", settings())
    assert hub_server.requests and all(r["auth"] is None for r in hub_server.requests)


def test_token_goes_to_the_https_hub_only_never_to_redirect_targets(https_hub, hub_server, server, tmp_path,
                                                                    monkeypatch):
    """HTTPS hub on a trusted host gets the saved token; a redirect from it to plain HTTP on the same host, or to
    another host over HTTPS, never does."""
    import huggingface_hub.constants as hc

    Path(hc.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(hc.HF_TOKEN_PATH).write_text(TOKEN)  # what `hf auth login` saves
    files = {"a.bin": payload(3000, 1), "b.bin": payload(4000, 2), "c.bin": payload(5000, 3)}
    commit = https_hub.add("o/r", files, lfs=set(files))
    server.files["/cdn/b.bin"] = files["b.bin"]  # plain HTTP, same host 127.0.0.1
    https_hub.redirect[f"/datasets/o/r/resolve/{commit}/b.bin"] = f"{server.base}/cdn/b.bin"
    other = f"https://localhost:{https_hub.httpd.server_address[1]}"
    https_hub.redirect[f"/datasets/o/r/resolve/{commit}/c.bin"] = f"{other}/cdn/c.bin"
    https_hub.cdn["/cdn/c.bin"] = files["c.bin"]  # the same HTTPS server under another host name
    s = settings(hf_base=https_hub.base, token_hosts=["127.0.0.1"])
    doc = sources.download_dataset(hub_card("o/r", commit, files=list(files)), tmp_path / "raw" / "r", s)
    assert {f["name"]: f["verified"] for f in doc["files"]} == {n: ["sha256"] for n in files}
    assert {n: (tmp_path / "raw" / "r" / n).read_bytes() for n in files} == files
    hub_reqs = [r for r in https_hub.requests if not r["path"].startswith("/cdn/")]
    assert hub_reqs and all(r["auth"] == f"Bearer {TOKEN}" for r in hub_reqs)
    cdn_reqs = [r for r in https_hub.requests if r["path"].startswith("/cdn/")]
    assert cdn_reqs and all(r["auth"] is None for r in cdn_reqs)  # another host over HTTPS: no token
    assert [r["path"] for r in server.requests] == ["/cdn/b.bin"] and server.requests[0]["auth"] is None


def test_the_client_guard_strips_credentials_on_every_hop(server, hub_server):
    """The request hook itself (below the library's own policy): a request that carries the token to a plain-HTTP
    URL, and the hops of a redirect, leave without it."""
    from huggingface_hub import get_session

    from voco.data import hub

    server.files["/x"] = b"x"
    server.redirect["/r"] = f"http://localhost:{server.port}/x"
    hub.install_guard(settings(token_hosts=["127.0.0.1", "localhost"]))
    for path in ("/x", "/r"):
        get_session().get(server.base + path, headers={"authorization": f"Bearer {TOKEN}"})
    assert [r["path"] for r in server.requests] == ["/x", "/r", "/x"]
    assert all(r["auth"] is None for r in server.requests)
    assert hub.token_allowed("https://huggingface.co/api", ["huggingface.co"])
    assert not hub.token_allowed("http://huggingface.co/api", ["huggingface.co"])
    assert not hub.token_allowed("https://hf-mirror.com/api", ["huggingface.co"])


def test_fetch_model_file_pinned_with_sha256(hub_server, tmp_path):
    from voco.data.hub import fetch_model_file

    weights = payload(20_000, 7)
    commit = hub_server.add("Luffy503/VoCo", {"VoCo_B_SSL_head.pt": weights}, lfs={"VoCo_B_SSL_head.pt"},
                            repo_type="model")
    s = settings(hf_base=hub_server.base)
    out = tmp_path / "weights" / "VoCo_B_SSL_head.pt"
    assert fetch_model_file("Luffy503/VoCo", "VoCo_B_SSL_head.pt", commit, sha(weights), out, s) == out
    assert out.read_bytes() == weights
    assert any(r["path"] == f"/Luffy503/VoCo/resolve/{commit}/VoCo_B_SSL_head.pt" for r in hub_server.requests)
    n = len(hub_server.requests)
    fetch_model_file("Luffy503/VoCo", "VoCo_B_SSL_head.pt", commit, sha(weights), out, s)
    assert len(hub_server.requests) == n  # verified file kept, no network
    out.unlink()
    with pytest.raises(DownloadError, match="sha256"):
        fetch_model_file("Luffy503/VoCo", "VoCo_B_SSL_head.pt", commit, "0" * 64, out, s)
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == []
    with pytest.raises(ConfigError, match="40-hex commit"):
        fetch_model_file("Luffy503/VoCo", "VoCo_B_SSL_head.pt", "main", sha(weights), out, s)


def test_shipped_hub_cards_are_flagged_until_pinned():
    """Every shipped huggingface card names its revision; none presents an invented commit. Unpinned ones are what
    `voco download` refuses without --allow-unpinned (see the cards' comments)."""
    from voco.data.hub import is_pinned

    cards = [yaml.safe_load(p.read_text()) for p in sorted(Path("config/datasets").glob("*.yaml"))]
    hub_cards = [c for c in cards if c["source"]["kind"] == "huggingface"]
    assert len(hub_cards) >= 20
    for c in hub_cards:
        rev = c["source"].get("revision")
        assert rev is not None, f"{c['id']}: source.revision must be stated"
        assert is_pinned(rev) or rev == "main", (c["id"], rev)


# ------------------------------------------------------------------------------------------------------- CLI


def _cli_env(tmp_path: Path, card: dict, download: dict | None = None) -> Path:
    cards = tmp_path / "cards"
    cards.mkdir(exist_ok=True)
    (cards / f"{card['id']}.yaml").write_text(yaml.safe_dump(card))
    ov = tmp_path / "override.yaml"
    ov.write_text(yaml.safe_dump({"cards_dir": str(cards), "download": download or {}}))
    return ov


def test_cli_local_link(tmp_path):
    local = tmp_path / "BTCV"
    (local / "imagesTr").mkdir(parents=True)
    (local / "imagesTr" / "img0001.nii.gz").write_bytes(b"img")
    (local / "dataset.json").write_text("{}")
    card = {"id": "btcv", "region": "abdomen", "source": {"kind": "manual", "instructions": "register at Synapse"}}
    ov = _cli_env(tmp_path, card, {"local": {"btcv": str(local)}})
    out = tmp_path / "raw" / "btcv"
    assert voco_main(["download", "--dataset", "btcv", "--out", str(out), "--override", str(ov)]) == 0
    assert (out / "imagesTr").is_symlink() and (out / "imagesTr" / "img0001.nii.gz").read_bytes() == b"img"
    doc = json.loads((out / "SOURCE.json").read_text())
    assert doc["kind"] == "local" and doc["n_files"] == 2 and not (local / "SOURCE.json").exists()
    # --copy with --hash
    out2 = tmp_path / "raw" / "btcv2"
    assert (
        voco_main(["download", "--dataset", "btcv", "--out", str(out2), "--override", str(ov), "--copy", "--hash"]) == 0
    )
    assert not (out2 / "imagesTr").is_symlink()
    assert {f["name"] for f in json.loads((out2 / "SOURCE.json").read_text())["files"]} == {
        "dataset.json",
        "imagesTr/img0001.nii.gz",
    }


def test_cli_manual_card_explains(tmp_path, capsys):
    card = {
        "id": "btcv",
        "region": "abdomen",
        "source": {"kind": "manual", "instructions": "Register at https://www.synapse.org/ and download RawData.zip"},
    }
    ov = _cli_env(tmp_path, card)
    rc = voco_main(["download", "--dataset", "btcv", "--out", str(tmp_path / "o"), "--override", str(ov)])
    err = capsys.readouterr().err
    assert rc == 2 and "synapse.org" in err and "download: {local: {btcv:" in err
    assert not (tmp_path / "o").exists()


def test_cli_http_download(server, tmp_path, monkeypatch):
    archive = tar_bytes({"dataset.json": b"{}"})
    server.files["/Task09_Demo.tar.gz"] = archive
    card = {
        "id": "demo",
        "region": "abdomen",
        "source": {"kind": "http", "url": server.base + "/Task09_Demo.tar.gz", "sha256": sha(archive)},
    }
    ov = _cli_env(tmp_path, card, {"retries": 1, "backoff_s": 0.01})
    load_card("demo", tmp_path / "cards")  # the card is valid
    out = tmp_path / "raw" / "demo"
    assert voco_main(["download", "--dataset", "demo", "--out", str(out), "--override", str(ov)]) == 0
    assert (out / "dataset.json").read_bytes() == b"{}"
    src = json.loads((out / "SOURCE.json").read_text())
    assert src["files"][0]["sha256"] == sha(archive) and src["files"][0]["verified"] == ["sha256"]
    assert src["extracted"] == ["Task09_Demo.tar.gz"] and sorted(p.name for p in out.iterdir()) == [
        "SOURCE.json", "dataset.json"]


def test_cli_hub_card_list_unpinned_flag_and_endpoint(hub_server, tmp_path, capsys):
    commit = hub_server.add("o/r", {"imagesTr/a.nii.gz": b"a" * 100, "README.md": b"r"}, lfs={"imagesTr/a.nii.gz"})
    card = {"id": "demo_hub", "region": "abdomen", "source": {"kind": "huggingface", "repo": "o/r",
                                                              "revision": "main", "include": ["imagesTr/"]}}
    ov = _cli_env(tmp_path, card)
    out = tmp_path / "raw" / "demo_hub"
    base = ["download", "--dataset", "demo_hub", "--out", str(out), "--override", str(ov), "--hf-base",
            hub_server.base]
    assert voco_main(base) == 2  # an unpinned card is refused, saying how to proceed
    assert "--allow-unpinned" in capsys.readouterr().err and not out.exists()
    assert voco_main([*base, "--list", "--allow-unpinned"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed == [{"name": "imagesTr/a.nii.gz", "size": 100, "checks": ["sha256"],
                       "url": f"{hub_server.base}/datasets/o/r/resolve/{commit}/imagesTr/a.nii.gz"}]
    assert voco_main([*base, "--allow-unpinned"]) == 0
    assert (out / "imagesTr" / "a.nii.gz").read_bytes() == b"a" * 100 and not (out / "README.md").exists()
    assert json.loads((out / "SOURCE.json").read_text())["revision"] == commit
