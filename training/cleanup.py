"""Failed checks leave nothing behind: what a run created under --out before it failed is
removed, and nothing that was there before it started."""

from __future__ import annotations

import shutil
from pathlib import Path


class Created:
    """Remembers what exists at and under `out` now; undo() removes whatever appeared since:
    --out itself and any parents this run made, or, in an existing --out, the new entries (a
    token cache, a tokenizer), never one that was there before."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.top: Path | None = None  # the highest directory on the way to --out that is missing
        self.before: set[Path] = set()
        self.armed = True  # disarm() once the checks are over: the run's own output then stays
        path = self.out.absolute()
        for p in (path, *path.parents):
            if p.exists() or p.is_symlink():
                break
            self.top = p
        if self.top is None and self.out.is_dir():
            self.before = set(self.out.rglob("*"))

    def disarm(self) -> None:
        self.armed = False

    def undo(self) -> None:
        if not self.armed:
            return
        try:
            if self.top is not None:
                shutil.rmtree(self.top, ignore_errors=True)
                return
            if not self.out.is_dir():
                return
            new = [p for p in self.out.rglob("*") if p not in self.before]
            for p in sorted(new, key=lambda p: len(p.parts)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: the error being reported matters more
