"""Shared helpers of the benchmark scripts: machine description and RESULTS.md section writing."""
import datetime
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    parts = [f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return "; ".join(parts) + f"; {datetime.date.today().isoformat()}"


def write_section(heading: str, body: str, results: Path = RESULTS) -> None:
    """Replace (or append) the `## heading` section of RESULTS.md with `body`; other sections stay."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    block = f"## {heading}\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    results.write_text(text)
