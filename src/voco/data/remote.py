"""What a download needs that both the HTTP fetcher (:mod:`voco.data.sources`) and the hub client
(:mod:`voco.data.hub`) share: the ``download`` settings, one remote file and its checksum verification."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from voco.errors import DownloadError


@dataclasses.dataclass
class Settings:
    """Network and extraction settings (config section ``download``)."""

    hf_base: str | None = None  # None: $HF_ENDPOINT, else https://huggingface.co
    mirrors: dict[str, str] = dataclasses.field(default_factory=dict)
    retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20
    token_env: str = "HF_TOKEN"
    token_hosts: list[str] = dataclasses.field(default_factory=lambda: ["huggingface.co", "hf.co"])
    workers: int = 8
    allow_unpinned: bool = False
    keep_archives: bool = False
    max_extract_bytes: int = 16 << 40
    max_members: int = 2_000_000
    max_ratio: float = 100.0
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: dict | None) -> Settings:
        sec = dict((cfg or {}).get("download", {}) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in sec.items() if k in known})

    def apply_mirrors(self, url: str) -> str:
        for prefix, repl in sorted(self.mirrors.items(), key=lambda kv: -len(kv[0])):
            if url.startswith(prefix):
                return repl + url[len(prefix) :]
        return url


@dataclasses.dataclass
class RemoteFile:
    """One file to fetch: where from, where to (relative to the downloads folder) and how to check it."""

    url: str
    name: str
    sha256: str | None = None
    md5: str | None = None
    git_oid: str | None = None  # git blob sha1 (small, non-LFS files on the hub)
    size: int | None = None


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _hashes(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def verify(path: Path, remote: RemoteFile, shown: str, remove_on_mismatch: bool) -> dict | None:
    """Check ``path`` against the remote's checksums. Returns the provenance record, None / raises on mismatch."""
    size = path.stat().st_size
    sha, md5 = _hashes(path)
    problems = []
    if remote.size is not None and size != remote.size:
        problems.append(f"size {size} != expected {remote.size}")
    if remote.sha256 and sha != remote.sha256.lower():
        problems.append(f"sha256 {sha} != expected {remote.sha256.lower()}")
    if remote.md5 and md5 != remote.md5.lower():
        problems.append(f"md5 {md5} != expected {remote.md5.lower()}")
    if remote.git_oid and _git_blob_sha1(path) != remote.git_oid.lower():
        problems.append(f"git blob id differs from the hub's {remote.git_oid}")
    if problems:
        if not remove_on_mismatch:
            return None
        path.unlink()
        raise DownloadError(
            f"{shown}: checksum mismatch for {remote.name}: {'; '.join(problems)}. The download was removed; if the "
            "file changed upstream, update the card's checksum (or pass --sha256)."
        )
    verified = [k for k, v in (("sha256", remote.sha256), ("md5", remote.md5), ("git_oid", remote.git_oid)) if v]
    return {"name": remote.name, "url": shown, "size": size, "sha256": sha, "verified": verified}
