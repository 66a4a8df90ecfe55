"""``voco download``: fill ``data/raw/<id>`` from a dataset card's source and write ``SOURCE.json`` last.

* ``huggingface``: files of a hub dataset (or model) repository at the card's pinned commit (``source.files`` or
  ``source.include`` globs), fetched in parallel with ``huggingface_hub`` and checked against the hub's own LFS sha256;
  split archives (``*.zip.001 ...``, ``*.part_aa ...``) are joined, archives extracted safely. A card whose
  ``source.revision`` is not a commit needs ``--allow-unpinned``.
* ``http``: archive URL(s) checked against the card's sha256 (or md5 where only that is published, or ``--sha256``).
* ``local`` (card, ``download.local.<id>`` in the config, or ``--from``): the folder is linked (or ``--copy``-ed).
* ``manual``: prints how to obtain the data (licence-gated) and exits with status 2.

The raw folder is replaced as a whole when everything worked (never merged with an earlier download). The hub token
(``$HF_TOKEN``, or the one ``hf auth login`` saved) goes only over HTTPS to ``download.token_hosts``; never logged.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from voco.config import add_config_arguments, config_from_args, load_card
from voco.data import hub, sources
from voco.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset card id (config/datasets/<id>.yaml)")
    parser.add_argument("--out", help="raw folder to fill (default: <paths.data>/raw/<id>)")
    add_config_arguments(parser)
    parser.add_argument("--sha256", help="checksum of a single-file http source whose card has none")
    parser.add_argument(
        "--allow-unverified", action="store_true", help="accept http files without any checksum (recorded as such)"
    )
    parser.add_argument("--from", dest="from_path", help="use this local copy instead of the card's source (linked)")
    parser.add_argument("--copy", action="store_true", help="copy a local source instead of symlinking it")
    parser.add_argument("--hash", action="store_true", help="local sources: record every file's sha256 in SOURCE.json")
    parser.add_argument("--hf-base", help="Hugging Face endpoint, overrides download.hf_base and $HF_ENDPOINT")
    parser.add_argument(
        "--allow-unpinned",
        action="store_true",
        help="accept a hub card whose source.revision is a branch or tag (resolved once; recorded in SOURCE.json)",
    )
    parser.add_argument("--list", action="store_true", help="print the files that would be fetched, fetch nothing")
    parser.add_argument("--no-flatten", action="store_true", help="keep an archive's single top-level folder")


def local_source(card: dict, cfg: dict, from_path: str | None) -> str | None:
    """The local copy to link, if any: ``--from``, then ``download.local.<id>``, then a ``local`` card's path."""
    if from_path:
        return from_path
    local = (cfg.get("download") or {}).get("local") or {}
    if card["id"] in local:
        return local[card["id"]]
    if card["source"]["kind"] == "local":
        path = card["source"].get("path")
        if not path:
            raise ConfigError(f"dataset {card['id']}: source.kind local needs source.path")
        return path
    return None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    card = load_card(args.dataset, cfg["cards_dir"])
    settings = sources.Settings.from_config(cfg)
    if args.hf_base:
        settings.hf_base = args.hf_base
    out = Path(args.out or Path(cfg["paths"]["data"]) / "raw" / card["id"])
    kind = card["source"]["kind"]
    local = local_source(card, cfg, args.from_path)
    if local is not None:
        if kind == "synthetic":
            raise ConfigError(f"dataset {card['id']} is synthetic: make it with `voco synth`, not from a local copy")
        copy = args.copy or card["source"].get("mode") == "copy"
        doc = sources.link_local(card, local, out, copy=copy, hash_files=args.hash)
        log.info("%s: linked %d entries from %s (%d files)", card["id"], len(doc["entries"]), local, doc["n_files"])
        return 0
    if kind == "synthetic":
        raise ConfigError(f"dataset {card['id']} is synthetic: run `voco synth --dataset {card['id']} --out {out}`")
    if args.list:
        if kind == "huggingface":
            base = hub.endpoint(settings)
            for f in sources.plan_hub(card, settings, allow_unpinned=args.allow_unpinned):
                checks = [k for k in ("sha256", "git_oid") if getattr(f, k)]
                url = hub.file_url(f.repo, f.repo_type, f.path, f.commit, base)
                print(json.dumps({"name": f.path, "url": url, "size": f.size, "checks": checks}))
            return 0
        for r in sources.plan(card, settings, sha256=args.sha256):
            checks = [k for k in ("sha256", "md5", "git_oid") if getattr(r, k)]
            print(json.dumps({"name": r.name, "url": sources._redact(r.url), "size": r.size, "checks": checks}))
        return 0
    doc = sources.download_dataset(
        card,
        out,
        settings,
        sha256=args.sha256,
        allow_unverified=args.allow_unverified,
        flatten=not args.no_flatten,
        allow_unpinned=args.allow_unpinned,
    )
    log.info(
        "%s: %d file(s) fetched, %d archive(s) extracted into %s",
        card["id"],
        len(doc["files"]),
        len(doc["extracted"]),
        out,
    )
    return 0
