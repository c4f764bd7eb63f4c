#!/usr/bin/env python3
"""Rewrite the config reference in README.md from ddpdiff/config.py (every key, type, default, meaning)."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpdiff import config  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- config-reference:[^\n]*-->\n```text\n).*?(```\n<!-- /config-reference -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + config.reference() + "\n" + m.group(2), text)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
