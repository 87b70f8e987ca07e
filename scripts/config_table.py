#!/usr/bin/env python
"""Print the Markdown table of every config option (key, default, meaning) for README."""
from dreambooth.config import schema_rows


def fmt(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if value != [] else "`[]`"


if __name__ == "__main__":
    print("| key | default | meaning |\n| --- | --- | --- |")
    for key, default, doc in schema_rows():
        print(f"| `{key}` | {fmt(default)} | {doc} |")
