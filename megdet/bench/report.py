"""Benchmark results as JSON and a Markdown table, written atomically."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from hpc.files import write_atomic


def machine() -> Dict[str, str]:
    """What the figures were measured on."""
    return {"cpu_count": str(os.cpu_count()), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch_threads": str(torch.get_num_threads())}


def markdown_table(rows: List[Dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``; floats with 4 significant digits."""
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write(out_dir: str, name: str, rows: List[Dict], columns: Sequence[str], inputs: Dict) -> str:
    """Write ``{name}.json`` (inputs, machine, rows) and ``{name}.md`` under ``out_dir``; return the table."""
    out = Path(out_dir)
    table = markdown_table(rows, columns)
    payload = {"benchmark": name, "inputs": inputs, "machine": machine(), "rows": rows}
    write_atomic(out / f"{name}.json", json.dumps(payload, indent=2, default=str))
    write_atomic(out / f"{name}.md", table + "\n")
    return table
