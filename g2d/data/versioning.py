"""DVC bookkeeping for fetched data: after `g2d data fetch` the bytes in `data/` are exactly those
`data.dvc` records, but a fresh clone's DVC cache is empty, so `dvc status` would call them
"not in cache". Committing them (never forcing) fills the cache without touching data.dvc."""

from __future__ import annotations

from pathlib import Path

from g2d.errors import DataError


def commit_tracked(root: Path, dvc_file: str = "data.dvc") -> bool:
    """`dvc commit` one .dvc file; False if the project does not use it. Refuses, naming the file,
    when the workspace differs from what the .dvc file records."""
    if not (root / ".dvc").is_dir() or not (root / dvc_file).is_file():
        return False
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            repo.commit(dvc_file, force=False)
    except DvcException as e:
        raise DataError(
            f"{root / dvc_file}: the fetched folder differs from what it records ({e}); remove extra or "
            "modified files from the folder, or `dvc add` it deliberately"
        ) from None
    return True
