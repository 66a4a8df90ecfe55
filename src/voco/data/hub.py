"""Hugging Face Hub sources through the ``huggingface_hub`` library: dataset and model repositories.

What this layer adds to the library:

* **pinned revisions**: a card names a commit (40 hex digits). A branch or tag is accepted only with
  ``--allow-unpinned`` (or ``download.allow_unpinned``); it is then resolved to its commit once, and every file is
  fetched at that commit and recorded with it in ``SOURCE.json`` (so a moving branch can never mix two states).
* **our own checks**: every file is verified after the download against the hub's listing (LFS sha256, or the git blob
  id of small files) and the card's own sha256 where it gives one; a mismatch removes the file.
* **credentials only to the hub itself, over HTTPS**: the token (``$HF_TOKEN`` / ``download.token_env``, else the one
  ``hf auth login`` saved) is handed to the library only when the endpoint is ``https://`` on a host of
  ``download.token_hosts`` (default the public hub); a mirror or a plain-HTTP endpoint gets no token. On top of that,
  the library's HTTP client gets a request hook that strips ``Authorization`` from any request (redirects included)
  that is not HTTPS to such a host.
* the endpoint: ``--hf-base`` > ``download.hf_base`` > ``$HF_ENDPOINT`` > ``https://huggingface.co``.

Files are fetched in parallel (``download.workers`` threads), each resumable (the library keeps ``.incomplete`` files
under ``<dest>/.cache/huggingface``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from voco.errors import ConfigError, DownloadError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
#: A pinned revision: a full commit id.
COMMIT = re.compile(r"[0-9a-f]{40}")
REPO_TYPES = ("dataset", "model")


def is_pinned(revision: object) -> bool:
    """Whether a card's ``source.revision`` pins a commit (40 lower-case hex digits)."""
    return isinstance(revision, str) and bool(COMMIT.fullmatch(revision))


def endpoint(settings: Any) -> str:
    """The hub endpoint: ``download.hf_base`` (or ``--hf-base``), else ``$HF_ENDPOINT``, else the public hub."""
    base = getattr(settings, "hf_base", None) or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return str(base).rstrip("/")


def token_allowed(url: str, hosts: Iterable[str]) -> bool:
    """Whether a request to ``url`` may carry the hub token: HTTPS, default port or explicit, host in ``hosts``."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" and (parts.hostname or "").lower() in {h.lower() for h in hosts}


def token_for(base: str, settings: Any) -> str | bool:
    """The token to hand to the library for ``base``: the user's token where allowed, ``False`` (send none) else."""
    if not token_allowed(base, settings.token_hosts):
        if _user_token(settings):
            log.info("hub endpoint %s is not HTTPS on one of download.token_hosts %s: no token is sent",
                     base, list(settings.token_hosts))
        return False
    return _user_token(settings) or False


def _user_token(settings: Any) -> str | None:
    tok = os.environ.get(getattr(settings, "token_env", "HF_TOKEN") or "HF_TOKEN", "").strip()
    if tok:
        return tok
    from huggingface_hub import get_token

    return get_token()  # $HF_TOKEN or the token `hf auth login` saved ($HF_HOME/token)


def install_guard(settings: Any) -> None:
    """Give the library an HTTP client whose request hook strips ``Authorization`` from every request that is not
    HTTPS to a host of ``download.token_hosts`` (redirect hops included). Replaces the library's shared client."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import hf_request_event_hook

    hosts = tuple(settings.token_hosts)

    def guard(request: httpx2.Request) -> None:
        if "authorization" in request.headers and not token_allowed(str(request.url), hosts):
            del request.headers["authorization"]
            log.debug("credentials withheld from %s (not HTTPS to a trusted hub host)", _shown(str(request.url)))

    def factory() -> httpx2.Client:
        # guard last: it sees the request exactly as it will be sent
        return httpx2.Client(event_hooks={"request": [hf_request_event_hook, guard]}, follow_redirects=True,
                             timeout=None)

    set_client_factory(factory)


def _shown(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", ""))


def _api(settings: Any):
    from huggingface_hub import HfApi

    base = endpoint(settings)
    install_guard(settings)
    return HfApi(endpoint=base, token=token_for(base, settings)), base


def _hub_error(e: Exception, what: str, settings: Any) -> DownloadError:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    hint = ""
    if isinstance(e, GatedRepoError):
        hint = (" (gated: accept its terms on the hub and log in with `hf auth login`, or export "
                f"{settings.token_env}; the token is sent only over HTTPS to {', '.join(settings.token_hosts)})")
    elif isinstance(e, RevisionNotFoundError):
        hint = " (no such revision: check the card's source.revision)"
    elif isinstance(e, RepositoryNotFoundError):
        hint = " (no such repository, or it is private and no token was sent: check source.repo and the endpoint)"
    elif isinstance(e, HfHubHTTPError):
        hint = f" (HTTP {getattr(e.response, 'status_code', '?')})"
    first = str(e).splitlines()[0] if str(e) else repr(e)
    return DownloadError(f"{what}: {type(e).__name__}: {first}{hint}")


def resolve_revision(repo: str, repo_type: str, revision: str, settings: Any, allow_unpinned: bool) -> str:
    """The commit to download: ``revision`` itself when it is one; a branch / tag only with ``allow_unpinned``.

    Raises:
        ConfigError: unpinned revision without ``allow_unpinned``.
        DownloadError: the hub cannot resolve it.
    """
    if is_pinned(revision):
        return revision
    if not allow_unpinned:
        raise ConfigError(
            f"hub {repo_type} {repo}: revision {revision!r} is not a commit, so the download would not be reproducible. "
            "Pin it (source.revision: <40-hex commit>), or pass --allow-unpinned (download.allow_unpinned: true) to "
            "resolve it now; the commit used is recorded in SOURCE.json"
        )
    api, base = _api(settings)
    try:
        info = api.repo_info(repo, repo_type=repo_type, revision=revision)
    except Exception as e:  # noqa: BLE001 - the library raises many types (HTTP, network, parsing)
        raise _hub_error(e, f"{base}: {repo_type} {repo}@{revision}", settings) from None
    sha = getattr(info, "sha", None)
    if not is_pinned(sha):
        raise DownloadError(f"{base}: {repo_type} {repo}@{revision}: the hub returned no commit id ({sha!r})")
    log.warning("hub %s %s: unpinned revision %r resolved to commit %s; put `revision: %s` in the card to pin it",
                repo_type, repo, revision, sha, sha)
    return sha


def list_files(repo: str, repo_type: str, commit: str, settings: Any) -> dict[str, dict]:
    """Every file of a repository at ``commit``: path -> ``{"path", "size", "sha256" | None, "oid" | None}``."""
    api, base = _api(settings)
    out: dict[str, dict] = {}
    try:
        for entry in api.list_repo_tree(repo, repo_type=repo_type, revision=commit, recursive=True):
            if not hasattr(entry, "blob_id"):  # a folder
                continue
            lfs = entry.lfs
            out[entry.path] = {
                "path": entry.path,
                "size": lfs.size if lfs else entry.size,
                "sha256": lfs.sha256 if lfs else None,
                "oid": None if lfs else entry.blob_id,
            }
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, f"{base}: listing {repo_type} {repo}@{commit}", settings) from None
    return out


def matches(path: str, patterns: Iterable[str]) -> bool:
    """A card's ``source.include`` semantics: a glob, or a folder prefix (``Folder/`` or ``Folder``)."""
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/*") + "/") for p in patterns)


def file_url(repo: str, repo_type: str, path: str, commit: str, base: str) -> str:
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{base}/{prefix}{repo}/resolve/{commit}/{urllib.parse.quote(path)}"


@dataclasses.dataclass
class HubFile:
    """One file of a hub repository to fetch, with what it must match."""

    repo: str
    repo_type: str
    commit: str
    path: str
    size: int | None = None
    sha256: str | None = None
    git_oid: str | None = None


def download(files: list[HubFile], dest: Path, settings: Any) -> list[dict]:
    """Fetch ``files`` into ``dest/<path>`` in parallel (``download.workers``), each verified; returns the records.

    Raises:
        DownloadError: any file failed (all failures are named) or did not match its checksum.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from voco.data.remote import RemoteFile, verify

    if not files:
        return []
    base = endpoint(settings)
    install_guard(settings)
    token = token_for(base, settings)
    (enable_progress_bars if settings.progress and sys.stderr.isatty() else disable_progress_bars)()
    dest.mkdir(parents=True, exist_ok=True)

    def one(f: HubFile) -> dict:
        try:
            local = hf_hub_download(f.repo, f.path, repo_type=f.repo_type, revision=f.commit, endpoint=base,
                                    token=token, local_dir=dest, etag_timeout=settings.timeout_s)
        except Exception as e:  # noqa: BLE001
            raise _hub_error(e, f"{base}: {f.repo_type} {f.repo}@{f.commit}: {f.path}", settings) from None
        remote = RemoteFile(url=file_url(f.repo, f.repo_type, f.path, f.commit, base), name=f.path,
                            sha256=f.sha256, git_oid=f.git_oid, size=f.size)
        record = verify(Path(local), remote, _shown(remote.url), remove_on_mismatch=True)
        assert record is not None
        return record

    workers = max(1, min(int(settings.workers), len(files)))
    records: dict[str, dict] = {}
    errors: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, f): f for f in files}
        for fut in concurrent.futures.as_completed(futures):
            f = futures[fut]
            try:
                records[f.path] = fut.result()
                log.info("fetched %s (%s bytes)", f.path, records[f.path]["size"])
            except DownloadError as e:
                errors.append(str(e))
    if errors:
        raise DownloadError(f"{len(errors)} of {len(files)} hub file(s) failed: " + " | ".join(sorted(errors)[:5]))
    return [records[f.path] for f in files]


def fetch_model_file(
    repo: str,
    filename: str,
    revision: str,
    sha256: str,
    out: str | os.PathLike[str],
    settings: Any = None,
) -> Path:
    """Fetch one file of a hub **model** repository at a pinned commit, check its sha256, move it to ``out``.

    For released weights (``voco finetune --init file:...``): ``revision`` must be a commit and ``sha256`` the
    published checksum; an existing ``out`` with that checksum is kept without any network access.

    Raises:
        ConfigError: the revision is not a commit, or the sha256 is not 64 hex digits.
        DownloadError: the hub failed, or the file's sha256 differs (nothing is left at ``out``).
    """
    import shutil
    import tempfile

    from voco.data.remote import Settings
    from voco.io import sha256_file

    settings = settings or Settings()
    if not is_pinned(revision):
        raise ConfigError(f"model {repo}/{filename}: revision {revision!r} must be a 40-hex commit")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256 or ""):
        raise ConfigError(f"model {repo}/{filename}: sha256 {sha256!r} must be 64 hex digits")
    out = Path(out)
    if out.is_file() and sha256_file(out) == sha256.lower():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        f = HubFile(repo, "model", revision, filename, sha256=sha256.lower())
        download([f], stage, settings)
        os.replace(stage / filename, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
