"""Result files written atomically (a temporary name, then a rename): text, CSV, PNG figures.

Used by `jaxsae bench`, `jaxsae stitch` and `jaxsae analyze`, so that an interrupted command
never leaves a half-written table or plot behind."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    atomic_write(path, csv_text(rows, columns))


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Writes `fig` as PNG to `path` and closes it."""
    tmp = path.with_name(path.name + ".partial")
    fig.tight_layout()
    fig.savefig(tmp, format="png")
    pyplot().close(fig)
    tmp.replace(path)
