"""Writing a benchmark result: the readable table on stdout and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def emit(result: dict, output: str | None, table: Callable[[dict], str], print_table: bool) -> dict:
    """Prints ``table(result)`` when ``print_table``, writes ``result`` as JSON to ``output`` when
    given (parent directories created), and returns ``result``."""
    if print_table:
        print(table(result), flush=True)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
