"""Archives: split parts joined in order, safe extraction with limits, and folders replaced as a whole.

Extraction checks every member before the first byte is written (absolute paths, ``..``, links out of the target,
devices and fifos) and the archive as a whole against :class:`Limits` (``download.max_members``,
``max_extract_bytes``, ``max_ratio``: zip / tar bombs) and the free disk space; errors name the archive and member.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from voco.errors import DownloadError
from voco.io import atomic_path

_SPLIT_RE = (
    re.compile(r"^(?P<base>.+)\.(?P<idx>\d{3})$"),  # name.zip.001, name.zip.002, ...
    re.compile(r"^(?P<base>.+)\.part_?(?P<idx>[a-z]{2,})$"),  # name.tar.gz.part_aa / .partaa (split -a)
)
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


@dataclasses.dataclass
class Limits:
    """Extraction limits (the ``download`` section's keys of the same names; :class:`voco.data.sources.Settings`
    carries them too and can be passed wherever a Limits is expected)."""

    max_extract_bytes: int = 16 << 40
    max_members: int = 2_000_000
    max_ratio: float = 100.0


# ----------------------------------------------------------------------------------------------- split archives


def split_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Group split-archive parts by the joined name, each group in order.

    Raises:
        DownloadError: a group has a gap (e.g. ``.001`` and ``.003`` but no ``.002``).
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for n in names:
        for rx in _SPLIT_RE:
            m = rx.match(n)
            if m and any(m.group("base").endswith(s) for s in _ARCHIVE_SUFFIXES):
                groups.setdefault(m.group("base"), []).append((m.group("idx"), n))
                break
    out = {}
    for base, parts in groups.items():
        parts.sort(key=lambda p: (len(p[0]), p[0]))
        idx = [p[0] for p in parts]
        if idx[0].isdigit():
            nums = [int(i) for i in idx]
            if nums != list(range(nums[0], nums[0] + len(nums))) or nums[0] not in (0, 1):
                raise DownloadError(f"split archive {base}: parts {idx} are not consecutive from 000/001")
        else:
            expect = [_alpha_index(i) for i in idx]
            if expect != list(range(len(idx))):
                raise DownloadError(f"split archive {base}: parts {idx} are not consecutive from 'aa'")
        out[base] = [p[1] for p in parts]
    return out


def _alpha_index(s: str) -> int:
    v = 0
    for ch in s:
        v = v * 26 + (ord(ch) - ord("a"))
    return v


def join_parts(parts: list[Path], dest: Path) -> Path:
    """Concatenate ``parts`` in order into ``dest`` (atomic)."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return dest


# --------------------------------------------------------------------------------------------- safe extraction


def is_archive(name: str) -> bool:
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


def _check_member_path(archive: Path, name: str, root: Path) -> Path:
    if not name or "\x00" in name:
        raise DownloadError(f"{archive}: unsafe member {name!r}: empty or NUL in name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise DownloadError(f"{archive}: unsafe member {name!r}: absolute path")
    if ".." in PurePosixPath(norm).parts:
        raise DownloadError(f"{archive}: unsafe member {name!r}: path traversal ('..')")
    target = (root / norm).resolve()
    if not _inside(target, root):
        raise DownloadError(f"{archive}: unsafe member {name!r}: resolves outside the target folder")
    return target


def _inside(path: Path, root: Path) -> bool:
    root = root.resolve()
    return path == root or root in path.parents


def _check_link(archive: Path, name: str, link: str, root: Path, hard: bool) -> None:
    norm_name = name.replace("\\", "/")
    if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
        raise DownloadError(f"{archive}: unsafe member {name!r}: link to absolute path {link!r}")
    base = root if hard else (root / norm_name).parent
    target = Path(os.path.normpath(base / link))
    if not _inside(target, root):
        raise DownloadError(f"{archive}: unsafe member {name!r}: link {link!r} points outside the target folder")


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str], settings: Any = None) -> list[str]:
    """Extract a zip / tar(.gz|.bz2|.xz) archive into ``dest`` after checking every member and the whole.

    Before the first byte is written: absolute paths, ``..`` components, symlinks or hardlinks pointing outside
    ``dest``, devices and fifos raise :class:`DownloadError` naming the member; so do more than
    ``settings.max_members`` members, more than ``settings.max_extract_bytes`` bytes in all, a total more than
    ``settings.max_ratio`` times the archive's size (a zip / tar bomb), and a total larger than the free space.

    Returns:
        the extracted member names.
    """
    settings = settings or Limits()
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    name = archive.name.lower()
    if name.endswith(".zip"):
        return _extract_zip(archive, root, settings)
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return _extract_tar(archive, root, settings)
    raise DownloadError(f"{archive}: not a supported archive (zip, tar, tar.gz, tgz, tar.bz2, tar.xz)")


class _Budget:
    """Running totals of an archive's members against the extraction limits (checked member by member)."""

    def __init__(self, archive: Path, root: Path, settings: Any) -> None:
        self.archive, self.root, self.s = archive, root, settings
        self.size = max(1, archive.stat().st_size)
        self.members = 0
        self.total = 0

    def add(self, name: str, nbytes: int) -> None:
        self.members += 1
        self.total += max(0, int(nbytes))
        a = self.archive
        if self.members > self.s.max_members:
            raise DownloadError(f"{a}: more than download.max_members = {self.s.max_members} members (at {name!r})")
        if self.total > self.s.max_extract_bytes:
            raise DownloadError(
                f"{a}: members add up to more than download.max_extract_bytes = {self.s.max_extract_bytes} bytes "
                f"(at {name!r}); raise the limit in the config if this archive is genuine"
            )
        if self.total > self.s.max_ratio * self.size:
            raise DownloadError(
                f"{a}: compression ratio over download.max_ratio = {self.s.max_ratio:g} ({self.total} bytes from a "
                f"{self.size}-byte archive at {name!r}): refusing a possible zip / tar bomb"
            )

    def check_free_space(self) -> None:
        free = shutil.disk_usage(self.root).free
        if self.total > free:
            raise DownloadError(
                f"{self.archive}: needs {self.total} bytes to extract but {self.root} has only {free} bytes free"
            )


def _extract_zip(archive: Path, root: Path, settings: Any) -> list[str]:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a valid zip file: {e}") from None
    budget = _Budget(archive, root, settings)
    with zf:
        infos = zf.infolist()
        for info in infos:
            _check_member_path(archive, info.filename, root)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                link = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, info.filename, link, root, hard=False)
                raise DownloadError(f"{archive}: unsafe member {info.filename!r}: symbolic links are not extracted")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise DownloadError(f"{archive}: unsafe member {info.filename!r}: special file")
            budget.add(info.filename, 0 if info.is_dir() else info.file_size)
        budget.check_free_space()
        for info in infos:
            target = _check_member_path(archive, info.filename, root)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with zf.open(info) as src, open(target, "wb") as out:  # the reader stops at the declared size (CRC-checked)
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > info.file_size:
                        raise DownloadError(f"{archive}: member {info.filename!r} is larger than it declares")
                    out.write(block)
        return [i.filename for i in infos]


def _extract_tar(archive: Path, root: Path, settings: Any) -> list[str]:
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise DownloadError(f"{archive}: not a valid tar file: {e}") from None
    budget = _Budget(archive, root, settings)
    with tf:
        members = []
        try:
            for m in tf:  # header by header: an over-limit header stops the scan before its data is decompressed
                _check_member_path(archive, m.name, root)
                if m.issym():
                    _check_link(archive, m.name, m.linkname, root, hard=False)
                elif m.islnk():
                    _check_link(archive, m.name, m.linkname, root, hard=True)
                elif not (m.isfile() or m.isdir()):
                    raise DownloadError(f"{archive}: unsafe member {m.name!r}: device, fifo or other special file")
                budget.add(m.name, m.size if m.isfile() else 0)
                members.append(m)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DownloadError(f"{archive}: corrupt tar archive: {type(e).__name__}: {e}") from None
        budget.check_free_space()
        # The stdlib 'data' filter re-checks the same things (and strips set-uid bits) as a second line of defence.
        try:
            tf.extractall(root, members=members, filter="data")
        except tarfile.FilterError as e:
            raise DownloadError(f"{archive}: unsafe member: {e}") from None
        return [m.name for m in members]


def merge_move(src: Path, dest: Path) -> None:
    """Move the contents of ``src`` into ``dest``, merging folders (files are replaced)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in list(src.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            merge_move(entry, target)
            entry.rmdir()
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)


def single_top_folder(folder: Path) -> Path | None:
    entries = [e for e in folder.iterdir() if not e.name.startswith("__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return None


def replace_dir(new: Path, out: Path) -> None:
    """Make ``new`` (a finished folder beside ``out``) become ``out``; the previous ``out`` is removed, never merged.

    Two renames on one filesystem: at every moment ``out`` is either the complete old or the complete new folder, or
    (for an instant, after a kill) absent with the old one kept as ``.<name>.old-<pid>`` beside it.
    """
    old = None
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
