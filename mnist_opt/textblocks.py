"""Generated sections of a text file (the README's tables): the text between two markers."""
from __future__ import annotations

import re
from pathlib import Path

from mnist_opt.errors import MnistOptError


def replace_between(path: Path, start: str, end: str, text: str) -> None:
    """Replace what stands between the ``start`` and ``end`` marker lines of ``path``."""
    content = path.read_text()
    if start not in content or end not in content:
        raise MnistOptError(f"{path} has no {start} … {end} markers to put the table between")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: f"{start}\n{text}{end}", content, count=1))


def between(path: Path, start: str, end: str) -> str:
    """What stands between the markers now (for the test that it is up to date)."""
    content = path.read_text()
    return content[content.index(start) + len(start) + 1:content.index(end)]
