"""Getting a dataset's raw files: HTTP archives, Hugging Face hub repositories, local folders.

HTTP(S) archives use the standard library (``urllib``); hub repositories go through ``huggingface_hub``
(:mod:`voco.data.hub`: pinned commits, parallel files, ``HF_ENDPOINT`` and the saved token). Guarantees:

* **checked**: a file is only used after its checksum matched (sha256 from the card or the user, md5 where only that
  is published, the hub's LFS sha256 / git blob id for hub files). A mismatch raises
  :class:`~voco.errors.DownloadError` and leaves nothing in place.
* **resumable**: HTTP bytes arrive in ``<name>.part``; an interrupted or truncated transfer continues with an HTTP
  ``Range`` request instead of starting over (hub files: the library's ``.incomplete`` files).
* **retried**: HTTP 5xx / 429, connection errors, time-outs and truncated bodies are retried with exponential backoff.
* **atomic**: everything is fetched into ``.<id>.downloads/`` and extracted into a staging folder ``.<id>.staging-*``
  beside the raw folder; only when all of it worked (``SOURCE.json`` written last, inside the staging folder) does the
  staging folder replace ``data/raw/<id>`` (a re-download never merges into an old raw folder). On failure the staging
  folder is removed; the downloads folder stays so that the next attempt resumes.
* **safe extraction**: zip / tar members with absolute paths, ``..`` components, links pointing out of the target,
  devices or fifos are rejected before anything is extracted, and the error names the member; the archive's total
  size, member count and compression ratio are checked against ``download.max_extract_bytes``, ``max_members`` and
  ``max_ratio``, and the free space first.
* **credentials**: HTTP sources and mirrors never receive any; the hub token goes only over HTTPS to the hosts of
  ``download.token_hosts`` (see :mod:`voco.data.hub`); it is never logged or written anywhere.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

from voco.data import hub
from voco.data.archives import (  # noqa: F401 - re-exported: the download API users know
    is_archive,
    join_parts,
    merge_move,
    replace_dir,
    safe_extract,
    single_top_folder,
    split_groups,
)
from voco.data.remote import RemoteFile, Settings, _hashes, verify  # noqa: F401 - re-exported: the download API users know
from voco.errors import ConfigError, DownloadError
from voco.io import write_json

log = logging.getLogger(__name__)

SOURCE_FILE = "SOURCE.json"
USER_AGENT = "voco-download/0.1 (+urllib)"


# --------------------------------------------------------------------------------------------------------- HTTP


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener()


def _request(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> urllib.request.Request:
    """An HTTP request for an archive source: never any credentials (archives and mirrors are public)."""
    req = urllib.request.Request(url, method=method)
    req.add_header("User-Agent", USER_AGENT)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    return req


class _Retryable(Exception):
    """A transient failure: retry after a backoff."""


def _is_retryable_status(code: int) -> bool:
    return code >= 500 or code in (408, 429)


def _http_error(url: str, e: urllib.error.HTTPError) -> DownloadError:
    hint = ""
    if e.code in (401, 403):
        hint = " (access denied: the source may need a login; download it yourself and use --from / download.local)"
    elif e.code == 404:
        hint = " (not found: check the card's URL or the mirror prefix)"
    return DownloadError(f"{_redact(url)}: HTTP {e.code} {e.reason}{hint}")


def _redact(url: str) -> str:
    """Drop query strings (signed URLs carry credentials in them) and user:password from a URL before logging it."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _with_retries(what: str, settings: Settings, fn):
    """Call ``fn()``; on :class:`_Retryable` sleep ``backoff_s * 2**k`` (capped) and try again, up to ``retries``."""
    attempt = 0
    while True:
        try:
            return fn()
        except _Retryable as e:
            if attempt >= settings.retries:
                raise DownloadError(f"{what}: giving up after {attempt + 1} attempts: {e}") from None
            delay = min(settings.backoff_s * (2**attempt), settings.backoff_max_s)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, e, attempt + 1, settings.retries, delay)
            time.sleep(delay)
            attempt += 1


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` -> (START, TOTAL); None where absent or ``*``."""
    if not value:
        return None, None
    m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", value.strip())
    if m:
        return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))
    m = re.match(r"bytes\s+\*/(\d+)", value.strip())
    if m:
        return None, int(m.group(1))
    return None, None


def _progress(total: int | None, initial: int, name: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False)


def fetch(remote: RemoteFile, dest: str | os.PathLike[str], settings: Settings) -> dict:
    """Download ``remote`` to ``dest`` (resuming ``dest.part``), verify it, move it into place atomically.

    Returns a provenance record ``{"name", "url", "size", "sha256", "verified"}``. An existing complete ``dest`` that
    passes the checks is kept (no network access).

    Raises:
        DownloadError: HTTP 4xx, retries exhausted, or checksum mismatch (the partial file is removed then).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = settings.apply_mirrors(remote.url)
    shown = _redact(url)
    if dest.is_file():
        record = verify(dest, remote, shown, remove_on_mismatch=False)
        if record is not None:
            log.info("%s: already downloaded and verified", dest.name)
            return record
        log.warning("%s: existing file fails its checksum; downloading again", dest)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")

    def once() -> None:
        have = part.stat().st_size if part.exists() else 0
        if remote.size is not None and have == remote.size:
            return  # complete already (a previous run died between the last byte and the rename)
        if remote.size is not None and have > remote.size:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        req = _request(url, headers)
        try:
            resp = _opener().open(req, timeout=settings.timeout_s)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                _, total = _content_range_start(e.headers.get("Content-Range"))
                if total is not None and total == have:
                    return  # the part file holds every byte
                part.unlink()  # our partial file does not fit the remote file: start over
                raise _Retryable("HTTP 416 for the partial file; restarting from byte 0") from None
            if _is_retryable_status(e.code):
                raise _Retryable(f"HTTP {e.code}") from None
            raise _http_error(url, e) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        with resp:
            status = resp.status
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            mode = "ab"
            start = have
            if have and status == 206:
                got_start, _ = _content_range_start(resp.headers.get("Content-Range"))
                if got_start is not None and got_start != have:
                    raise _Retryable(f"server resumed at byte {got_start}, expected {have}")
                log.info("%s: resuming at byte %d", dest.name, have)
            elif status == 200:
                if have:
                    log.info("%s: server ignored the Range request; starting over", dest.name)
                mode, start = "wb", 0
            elif status != 206:
                raise DownloadError(f"{shown}: unexpected HTTP status {status}")
            total = (start + expected) if expected is not None else remote.size
            received = 0
            with open(part, mode) as f, _progress(total, start, dest.name, settings.progress) as bar:
                try:
                    while block := resp.read(settings.chunk_bytes):
                        f.write(block)
                        received += len(block)
                        if bar is not None:
                            bar.update(len(block))
                except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as e:
                    raise _Retryable(
                        f"transfer interrupted after {start + received} bytes ({type(e).__name__})"
                    ) from None
            if expected is not None and received < expected:
                raise _Retryable(f"truncated transfer: {received} of {expected} bytes; will resume")

    _with_retries(shown, settings, once)
    record = verify(part, remote, shown, remove_on_mismatch=True)
    assert record is not None  # verify raises on mismatch when remove_on_mismatch
    os.replace(part, dest)
    return record


# ---------------------------------------------------------------------------------------------------- plans


def hub_source(card: dict) -> tuple[str, str, str]:
    """(repo, repo type, revision) of a ``huggingface`` card (revision ``main`` when the card names none)."""
    src = card["source"]
    repo = src.get("repo")
    if not repo:
        raise ConfigError(f"dataset {card['id']}: source.kind huggingface needs source.repo")
    repo_type = src.get("repo_type", "dataset")
    if repo_type not in hub.REPO_TYPES:
        raise ConfigError(f"dataset {card['id']}: source.repo_type {repo_type!r} must be one of {hub.REPO_TYPES}")
    return repo, repo_type, str(src.get("revision") or "main")


def plan_hub(card: dict, settings: Settings, allow_unpinned: bool = False) -> list[hub.HubFile]:
    """The hub files a ``huggingface`` card asks for, at one commit, with the checksums to verify them against.

    Raises:
        ConfigError: the card does not pin a commit and ``allow_unpinned`` is off.
        DownloadError: the listing has no file that matches the card, or a listed file is missing.
    """
    src = card["source"]
    repo, repo_type, rev = hub_source(card)
    commit = hub.resolve_revision(repo, repo_type, rev, settings, allow_unpinned or settings.allow_unpinned)
    listing = hub.list_files(repo, repo_type, commit, settings)
    if src.get("files"):
        missing = [f for f in src["files"] if f not in listing]
        if missing:
            raise DownloadError(
                f"dataset {card['id']}: {len(missing)} file(s) listed in the card are not in hub repo {repo}@{commit}: "
                f"{', '.join(missing[:5])}"
            )
        wanted = list(src["files"])
    else:
        patterns = src.get("include") or ["*"]
        wanted = sorted(p for p in listing if hub.matches(p, patterns))
        if not wanted:
            raise DownloadError(
                f"dataset {card['id']}: no file in hub repo {repo}@{commit} matches include {patterns}; "
                f"run `voco download --dataset {card['id']} --list` and fix the card's source.include"
            )
    checks = src.get("checksums", {})
    out = []
    for path in wanted:
        meta = listing[path]
        c = checks.get(path)
        card_sha = c if isinstance(c, str) else (c or {}).get("sha256") if isinstance(c, dict) else None
        if card_sha and meta.get("sha256") and card_sha.lower() != meta["sha256"].lower():
            raise DownloadError(
                f"dataset {card['id']}: {path}: the card's sha256 {card_sha} differs from the hub's {meta['sha256']} "
                f"at commit {commit}: the file changed upstream or the card is wrong"
            )
        out.append(hub.HubFile(repo, repo_type, commit, path, size=meta.get("size"),
                               sha256=card_sha or meta.get("sha256"), git_oid=meta.get("oid")))
    return out


def plan(card: dict, settings: Settings, sha256: str | None = None) -> list[RemoteFile]:
    """The files of an ``http`` card's source, with the checksums to verify them against.

    Args:
        card: a validated dataset card.
        sha256: the user's checksum for a single-file http source whose card has none.

    Raises:
        ConfigError: the card's source is not an http one, or it misses keys.
    """
    src = card["source"]
    kind = src["kind"]
    if kind == "http":
        urls = [src["url"]] if src.get("url") else []
        urls += list(src.get("urls", []))
        if not urls:
            raise ConfigError(f"dataset {card['id']}: source.kind http needs source.url")
        checks = dict(src.get("checksums", {}))
        out = []
        for url in urls:
            name = PurePosixPath(urllib.parse.urlsplit(url).path).name or "download"
            c = checks.get(name, {}) if isinstance(checks.get(name), dict) else {"sha256": checks.get(name)}
            sha = c.get("sha256") or (src.get("sha256") if len(urls) == 1 else None)
            md5 = c.get("md5") or (src.get("md5") if len(urls) == 1 else None)
            if sha256 and len(urls) == 1:
                sha = sha256
            out.append(RemoteFile(url=url, name=name, sha256=sha, md5=md5))
        return out
    if kind == "huggingface":
        raise ConfigError(f"dataset {card['id']}: huggingface sources are planned by plan_hub")
    if kind == "manual":
        raise ConfigError(manual_message(card))
    if kind == "local":
        raise ConfigError(f"dataset {card['id']}: source.kind local is linked, not downloaded (voco download links it)")
    raise ConfigError(f"dataset {card['id']}: source.kind {kind} is not downloadable (use `voco synth` for synthetic)")


def manual_message(card: dict) -> str:
    src = card["source"]
    text = (src.get("instructions") or "obtain the data from its publisher").strip()
    return (
        f"dataset {card['id']} ({card.get('name', card['id'])}) cannot be downloaded automatically (licence-gated).\n"
        f"{text}\n"
        f"Then point the pipeline at your copy: add `download: {{local: {{{card['id']}: /path/to/copy}}}}` to an "
        f"override file (or run `voco download --dataset {card['id']} --from /path/to/copy --out data/raw/{card['id']}`)."
    )


# ------------------------------------------------------------------------------------------------- entry points


def download_dataset(
    card: dict,
    out: str | os.PathLike[str],
    settings: Settings,
    sha256: str | None = None,
    allow_unverified: bool = False,
    flatten: bool = True,
    allow_unpinned: bool = False,
) -> dict:
    """Fetch a card's source and make ``out`` hold exactly it: download, join split archives, extract safely into a
    staging folder, write SOURCE.json there last, then replace ``out`` with the staging folder.

    Args:
        card: validated dataset card (source kind http or huggingface).
        out: the raw folder, ``data/raw/<id>``.
        sha256: the user's checksum for a single-file http source without one in the card.
        allow_unverified: accept http files that have no checksum at all (recorded as unverified).
        flatten: an archive holding a single top-level folder is unpacked into ``out`` directly.
        allow_unpinned: accept a hub revision that is not a commit (resolved once, recorded in SOURCE.json).

    Returns:
        the SOURCE.json document.
    """
    out = Path(out)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    dl = parent / f".{out.name}.downloads"  # kept on failure: the next attempt resumes from it
    src = card["source"]
    kind = src["kind"]
    provenance: dict[str, Any] = {}
    if kind == "huggingface":
        files = plan_hub(card, settings, allow_unpinned=allow_unpinned)
        repo, repo_type, rev = hub_source(card)
        provenance = {"repo": repo, "repo_type": repo_type, "revision": files[0].commit if files else None,
                      "requested_revision": rev, "endpoint": hub.endpoint(settings)}
        records = hub.download(files, dl, settings)
        names = [f.path for f in files]
    else:
        remotes = plan(card, settings, sha256=sha256)
        unverified = [r.name for r in remotes if not (r.sha256 or r.md5 or r.git_oid)]
        if unverified and not allow_unverified:
            raise DownloadError(
                f"dataset {card['id']}: no checksum for {', '.join(unverified)}: the card has none. Pass --sha256 HEX "
                "(the publisher's checksum) or --allow-unverified to record it as unverified."
            )
        records = []
        for r in remotes:
            log.info("fetching %s", r.name)
            records.append(fetch(r, _safe_rel(dl, r.name), settings))
        names = [r.name for r in remotes]
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=parent))
    try:
        joined: list[Path] = []
        grouped = split_groups(names)
        in_groups = {n for parts in grouped.values() for n in parts}
        for base, parts in grouped.items():
            log.info("joining %d parts into %s", len(parts), base)
            joined.append(join_parts([_safe_rel(dl, p) for p in parts], _safe_rel(dl, base)))
        plain = [_safe_rel(dl, n) for n in names if n not in in_groups]
        extracted: list[str] = []
        for k, f in enumerate([*plain, *joined]):
            if is_archive(f.name):
                into = staging / f".extract-{k}"
                log.info("extracting %s", f.name)
                members = safe_extract(f, into, settings)
                extracted.append(f.name)
                log.debug("%s: %d members", f.name, len(members))
                top = single_top_folder(into) if flatten else None
                merge_move(top or into, staging)
                shutil.rmtree(into, ignore_errors=True)
            else:
                target = _safe_rel(staging, str(f.relative_to(dl)))
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copy2 if settings.keep_archives else os.replace)(f, target)
        doc = {
            "dataset": card["id"],
            "kind": kind,
            "repo": src.get("repo"),
            "revision": None,
            **provenance,
            "files": records,
            "joined": [p.name for p in joined],
            "extracted": extracted,
            "unverified": [r["name"] for r in records if not r["verified"]],
        }
        write_json(staging / SOURCE_FILE, doc)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not settings.keep_archives:
        shutil.rmtree(dl, ignore_errors=True)
    return doc


def _safe_rel(root: Path, rel: str) -> Path:
    """``root/rel`` for a file name that came from a card or a hub listing (never outside ``root``)."""
    from voco.ids import safe_join

    try:
        return safe_join(root, rel)
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - UnsafePathError: say it as a download problem
        raise DownloadError(f"unsafe remote file name {rel!r}: {e}") from None


def _remove_leftovers(out: Path) -> None:
    """Staging / old folders a killed earlier run left beside ``out`` (never the downloads folder: it resumes)."""
    for p in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def link_local(
    card: dict,
    src_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    copy: bool = False,
    hash_files: bool = False,
) -> dict:
    """Make ``out`` show the user's local copy ``src_dir``: one symlink (or copy) per top-level entry + SOURCE.json.

    The user's folder is never written to; SOURCE.json goes into ``out``.
    """
    src_dir = Path(src_dir).expanduser()
    out = Path(out)
    if not src_dir.is_dir():
        raise DownloadError(f"dataset {card['id']}: local source folder {src_dir} does not exist")
    src_dir = src_dir.resolve()
    entries = sorted(e for e in src_dir.iterdir() if e.name != SOURCE_FILE)
    if not entries:
        raise DownloadError(f"dataset {card['id']}: local source folder {src_dir} is empty")
    if out.resolve() == src_dir:
        raise DownloadError(f"dataset {card['id']}: the local copy {src_dir} is the output folder itself")
    (out / SOURCE_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for e in entries:
        target = out / e.name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        if copy:
            (shutil.copytree if e.is_dir() else shutil.copy2)(e, target)
        else:
            target.symlink_to(e, target_is_directory=e.is_dir())
    files = []
    n_files, total = 0, 0
    for p in sorted(src_dir.rglob("*")):
        if p.is_file():
            n_files += 1
            size = p.stat().st_size
            total += size
            if hash_files:
                files.append({"name": str(p.relative_to(src_dir)), "size": size, "sha256": _hashes(p)[0]})
    doc = {
        "dataset": card["id"],
        "kind": "local",
        "path": str(src_dir),
        "mode": "copy" if copy else "symlink",
        "entries": [e.name for e in entries],
        "n_files": n_files,
        "total_bytes": total,
        "files": files,
    }
    write_json(out / SOURCE_FILE, doc)
    return doc
