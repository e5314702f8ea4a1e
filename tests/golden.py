"""Golden files: a whole emitted resource compared with a reviewed copy in tests/golden/.

`UPDATE_GOLDEN=1 pytest ...` rewrites the files; review the diff before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, actual: Any) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(actual, indent=2, ensure_ascii=False) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1" or not path.exists():
        if os.environ.get("CI") == "true":
            raise AssertionError(f"golden file {path.name} is missing; run UPDATE_GOLDEN=1 locally")
        path.write_text(text, encoding="utf-8")
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert actual == expected, f"{name} differs from tests/golden/{path.name}"
