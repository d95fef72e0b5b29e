"""Rewrite the golden files (tests/golden/) after an intended change, then review `git diff tests/golden`.

The golden tests only compare: they never write their expectation. Run from the repository root:
    python3 tools/regold.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests`

from tests.goldens import all_goldens  # noqa: E402


def main() -> None:
    for path, text in all_goldens().items():
        changed = not path.exists() or path.read_text() != text
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"{'rewrote' if changed else 'same   '} {path}")


if __name__ == "__main__":
    main()
