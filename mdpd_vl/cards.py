"""Model cards: fill `model_cards/`-style templates with what a run measured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import mdpd_vl
from mdpd_vl.atomic import write_text

_TEMPLATE = Path(__file__).resolve().parent / "card_template.md"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; floats get two decimals."""
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_model_card(path: str | Path, fields: Mapping[str, Any], template: str | Path | None = None) -> Path:
    """Write the card atomically; `fields` fill the template's `{placeholders}`."""
    text = Path(template or _TEMPLATE).read_text()
    values = {"version": mdpd_vl.__version__, **fields}
    if "config_yaml" not in values and "config" in values:
        values["config_yaml"] = yaml.safe_dump(values["config"], sort_keys=False).strip()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text.format_map(_Missing(values)))  # atomic, umask honoured, full disk = one line
    return path


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return f"({key}: not recorded)"
