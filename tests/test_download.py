"""``voco download`` against a real HTTP server on 127.0.0.1 (http.server in a thread).

The handler serves registered files with HTTP Range support and can inject failures: HTTP 500s, a truncated body
(Content-Length promises more than is sent), a server that ignores Range, a redirect to another host name. It also
serves a Hugging Face style tree listing (``/api/datasets/<repo>/tree/<rev>``) and ``resolve`` URLs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
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
from voco.errors import DownloadError

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
    assert not (out / sources.DOWNLOADS_DIR).exists()
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


def test_split_groups():
    names = ["b.zip.002", "b.zip.001", "b.zip.003", "x.tar.gz.part_ab", "x.tar.gz.part_aa", "readme.md"]
    assert sources.split_groups(names) == {
        "b.zip": ["b.zip.001", "b.zip.002", "b.zip.003"],
        "x.tar.gz": ["x.tar.gz.part_aa", "x.tar.gz.part_ab"],
    }
    with pytest.raises(DownloadError, match="not consecutive"):
        sources.split_groups(["b.zip.001", "b.zip.003"])


# ---------------------------------------------------------------------------------------------- Hugging Face


def _hf_repo(server: Server, repo: str, files: dict[str, bytes], lfs: set[str], page: int | None = None) -> None:
    entries = []
    for path, data in files.items():
        server.files[f"/datasets/{repo}/resolve/main/{path}"] = data
        e = {"type": "file", "path": path, "size": len(data)}
        if path in lfs:
            e["lfs"] = {"oid": sha(data), "size": len(data)}
        else:
            e["oid"] = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        entries.append(e)
    entries.append({"type": "directory", "path": "sub"})
    tree = f"/api/datasets/{repo}/tree/main"
    server.trees[tree] = entries
    if page:  # split the listing in two pages linked by a Link header: emulate with a second path
        server.trees[tree] = entries[:page]
        server.trees[tree + "/p2"] = entries[page:]


def test_huggingface_split_zip_joined_extracted_and_token_private(server, tmp_path, monkeypatch, caplog):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("VoComni/imagesTr/VoComni_0_0000.nii.gz", payload(40_000, 2))
        zf.writestr("VoComni/labelsTr/VoComni_0.nii.gz", b"label")
    z = buf.getvalue()
    third = len(z) // 3
    files = {
        "VoComni.zip.001": z[:third],
        "VoComni.zip.002": z[third : 2 * third],
        "VoComni.zip.003": z[2 * third :],
        "README.md": b"# readme",
        "other/skip.bin": b"no",
    }
    _hf_repo(server, "Luffy503/VoComni", files, lfs={"VoComni.zip.001", "VoComni.zip.002", "VoComni.zip.003"})
    server.fail["/datasets/Luffy503/VoComni/resolve/main/VoComni.zip.002"] = 1
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    card = {
        "id": "vocomni",
        "region": "abdomen",
        "source": {"kind": "huggingface", "repo": "Luffy503/VoComni", "include": ["VoComni.zip.*", "README.md"]},
    }
    out = tmp_path / "raw" / "vocomni"
    with caplog.at_level(logging.DEBUG):
        doc = sources.download_dataset(card, out, settings(hf_base=server.base))
    assert (out / "imagesTr" / "VoComni_0_0000.nii.gz").read_bytes() == payload(40_000, 2)
    assert (out / "README.md").read_bytes() == b"# readme"
    assert not (out / "other").exists()
    assert doc["joined"] == ["VoComni.zip"]
    assert {f["name"]: f["verified"] for f in doc["files"]} == {
        "README.md": ["git_oid"],
        "VoComni.zip.001": ["sha256"],
        "VoComni.zip.002": ["sha256"],
        "VoComni.zip.003": ["sha256"],
    }
    # the token went to the hub host only, and never into logs or SOURCE.json
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in server.requests)
    assert TOKEN not in caplog.text
    assert TOKEN not in (out / "SOURCE.json").read_text()


def test_huggingface_lfs_checksum_mismatch(server, tmp_path):
    _hf_repo(server, "o/r", {"a.bin": b"payload"}, lfs={"a.bin"})
    server.files["/datasets/o/r/resolve/main/a.bin"] = b"tampered"  # same length is not required: size is checked
    card = {"id": "r", "region": "abdomen", "source": {"kind": "huggingface", "repo": "o/r", "files": ["a.bin"]}}
    with pytest.raises(DownloadError, match="mismatch"):
        sources.download_dataset(card, tmp_path / "out", settings(hf_base=server.base))
    assert not (tmp_path / "out" / "SOURCE.json").exists()
    assert not list((tmp_path / "out").rglob("a.bin*"))


def test_huggingface_missing_file_and_empty_match(server, tmp_path):
    _hf_repo(server, "o/r", {"a.bin": b"payload"}, lfs=set())
    card = {"id": "r", "region": "abdomen", "source": {"kind": "huggingface", "repo": "o/r", "files": ["b.bin"]}}
    with pytest.raises(DownloadError, match="b.bin"):
        sources.plan(card, settings(hf_base=server.base))
    card["source"] = {"kind": "huggingface", "repo": "o/r", "include": ["nothing/*"]}
    with pytest.raises(DownloadError, match="--list"):
        sources.plan(card, settings(hf_base=server.base))


def test_token_not_forwarded_to_other_host(server, tmp_path, monkeypatch):
    data = payload(1000)
    server.files["/cdn/a.bin"] = data
    # 127.0.0.1 -> localhost: same server, different host name, as the hub's redirect to its CDN
    server.redirect["/datasets/o/r/resolve/main/a.bin"] = f"http://localhost:{server.port}/cdn/a.bin"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    remote = sources.RemoteFile(
        url=server.base + "/datasets/o/r/resolve/main/a.bin", name="a.bin", sha256=sha(data), auth=True
    )
    sources.fetch(remote, tmp_path / "a.bin", settings())
    assert server.requests[0]["auth"] == f"Bearer {TOKEN}"
    assert server.requests[1]["path"] == "/cdn/a.bin" and server.requests[1]["auth"] is None


def test_tree_pagination(server):
    _hf_repo(server, "o/r", {"a.bin": b"1", "b.bin": b"2", "c.bin": b"3"}, lfs=set(), page=2)
    tree = "/api/datasets/o/r/tree/main"

    # serve a Link header on the first page
    orig = server.trees[tree]
    server.trees[tree] = orig
    handler_cls = server.httpd.RequestHandlerClass
    send_header = handler_cls.send_header

    def with_link(self, k, v):
        send_header(self, k, v)
        if k == "Content-Type" and self.path.startswith(tree + "?"):
            send_header(self, "Link", f'<{server.base}{tree}/p2>; rel="next"')

    handler_cls.send_header = with_link
    try:
        files = sources.hf_list_files("o/r", settings(hf_base=server.base))
    finally:
        handler_cls.send_header = send_header
    assert [f["path"] for f in files] == ["a.bin", "b.bin", "c.bin"]


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
    assert (out / "dataset.json").exists() and (out / "SOURCE.json").exists()
