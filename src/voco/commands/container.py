"""``voco container check|build``: the workflow's Apptainer image through spython.

Example::

    voco container check                      # parse containers/voco.def with spython and check it
    voco container build                      # check, then build containers/voco.sif (needs apptainer)
    snakemake --profile slurm --software-deployment-method apptainer all
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check", "build"], help="check the definition, or check and build")
    parser.add_argument("--def", dest="definition", type=Path, default=None,
                        help="definition file (default containers/voco.def of the repository)")
    parser.add_argument("--out", type=Path, default=None, help="image to build (default containers/voco.sif)")
    parser.add_argument("--force", action="store_true", help="rebuild an existing image")
    parser.add_argument("--fakeroot", action="store_true", help="build with --fakeroot (unprivileged builds)")


def run(args: argparse.Namespace) -> int:
    from voco.config import repo_root
    from voco.container import DEFAULT_DEF, DEFAULT_SIF, build, check
    from voco.errors import ContainerError

    root = repo_root()
    definition = args.definition or root / DEFAULT_DEF
    if args.action == "check":
        res = check(definition, root)
        log.info("%s: base image %s, %d %%files entries, %d pinned packages", definition, res.base_image,
                 len(res.files), len(res.pins))
        if not res.ok:
            raise ContainerError("; ".join(res.problems))
        print(f"{definition}: ok (spython parse; base {res.base_image}; pins agree with pyproject.toml)")
        return 0
    image = build(definition, args.out or root / DEFAULT_SIF, force=args.force, fakeroot=args.fakeroot, root=root)
    print(f"built {image}")
    return 0
