"""What the benchmark scripts share: the CPU's name for their header line, and writing their section of
``benchmarks/RESULTS.md`` (the section's old text is replaced; the other sections are kept)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

__all__ = ["RESULTS", "cpu_name", "write_section"]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's machine type."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def write_section(section: str, text: str) -> None:
    """Put ``text`` under the heading ``section`` (e.g. ``"## Batches"``) in RESULTS.md, replacing what was there."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{section}\n\n{text.strip()}\n\n"
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    RESULTS.write_text(new)
