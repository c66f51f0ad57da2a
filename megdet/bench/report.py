"""Benchmark results as JSON and a Markdown table, written atomically."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from hpc.files import write_atomic


def machine(cuda: bool = True) -> Dict[str, str]:
    """What the figures were measured on; ``cuda=False`` leaves the GPU unnamed (naming it initialises
    CUDA in this process, which a parent of the processes that use the GPU must not)."""
    return {"cpu_count": str(os.cpu_count()), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else "cpu",
            "torch_threads": str(torch.get_num_threads())}


def markdown_table(rows: List[Dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``; floats with 4 significant digits,
    None as "-"."""
    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write(out_dir: str, name: str, rows: List[Dict], columns: Sequence[str], inputs: Dict,
          machine_info: Optional[Dict] = None, state: Optional[Dict] = None) -> str:
    """Write ``{name}.json`` (inputs, machine, rows, and ``state`` if given: how far a run has come) and
    ``{name}.md`` under ``out_dir``; return the table. ``machine_info`` replaces ``machine()``."""
    out = Path(out_dir)
    table = markdown_table(rows, columns)
    payload = {"benchmark": name, "inputs": inputs, "machine": machine_info or machine(), "rows": rows}
    if state is not None:
        payload["state"] = state
    write_atomic(out / f"{name}.json", json.dumps(payload, indent=2, default=str))
    write_atomic(out / f"{name}.md", table + "\n")
    return table
