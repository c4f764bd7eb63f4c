#!/usr/bin/env python3
"""Rewrite the config references in README.md from ddpdiff/config.py (every key, type, default, meaning).

A block opened by `<!-- config-reference ROOT -->` lists the keys of `ddpdiff.config.ROOT`: all of them for
the diffusion trainer's `Config`, only their own sections for the other trainers' roots.
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpdiff import config  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- config-reference (\w+)[^\n]*-->\n```text\n).*?(```\n<!-- /config-reference -->)", re.S)


def render(text: str) -> str:
    def table(m: re.Match) -> str:
        root = getattr(config, m.group(2))
        return m.group(1) + config.reference(root, own=root is not config.Config) + "\n" + m.group(3)
    return BLOCK.sub(table, text)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
