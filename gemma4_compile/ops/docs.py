"""The op table of docs/export-format.md, generated from the contracts (between the ops markers).

python -m gemma4_compile.ops.docs [docs/export-format.md]    rewrites the block in place
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import Gemma4CompileError
from .registry import OPS

BEGIN, END = "<!-- ops:begin -->", "<!-- ops:end -->"
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "export-format.md"
HEADER = ("| op | domain | attributes | inputs | outputs | exported |", "|---|---|---|---|---|---|")


def render_table() -> str:
    """The generated block, markers included."""
    rows = [e.contract.doc_row() for e in OPS.values()]
    return "\n".join(
        (
            BEGIN,
            "<!-- generated from gemma4_compile/ops: python -m gemma4_compile.ops.docs -->",
            *HEADER,
            *rows,
            END,
        )
    )


def rewrite(text: str) -> str:
    """`text` with its block between the markers replaced by the current table."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise Gemma4CompileError(f"no '{BEGIN}' ... '{END}' block to rewrite")
    return text[:start] + render_table() + text[end + len(END) :]


def main(path: Path = DOC_PATH) -> bool:
    """Rewrite the table in `path`; returns whether it changed."""
    old = path.read_text()
    new = rewrite(old)
    if new != old:
        path.write_text(new)
    return new != old


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DOC_PATH)
