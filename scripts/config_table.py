#!/usr/bin/env python
"""Print the Markdown table of every config option (key, default, meaning); --write puts it in docs/configuration.md."""
import argparse
import sys
from pathlib import Path

from dreambooth.config import schema_rows

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
START, END = "<!-- options:start -->", "<!-- options:end -->"


def fmt(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if value != [] else "`[]`"


def table() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {fmt(default)} | {doc} |" for key, default, doc in schema_rows()]
    return "\n".join(lines) + "\n"


def write(path: Path) -> bool:
    """Replace the text between the markers in `path` with the table; True if the file changed."""
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{path}: needs one {START} line and one {END} line after it, to put the table between")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    new = f"{head}{START}\n{table()}{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", nargs="?", const=DOC, type=Path, metavar="FILE",
                        help=f"rewrite the table between the markers in FILE (default {DOC.relative_to(DOC.parents[1])})")
    args = parser.parse_args()
    if args.write is None:
        sys.stdout.write(table())
        sys.exit(0)
    try:
        changed = write(args.write)
    except (OSError, ValueError) as e:  # a missing file or missing markers: one line, no traceback
        print(f"config_table: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.write}: {'table rewritten' if changed else 'table already up to date'}")
