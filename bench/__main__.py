"""Run every benchmark: `python -m bench` (or `make bench`)."""

from __future__ import annotations

from bench import intake, mapping


def main() -> None:
    intake.main()
    mapping.main()


if __name__ == "__main__":
    main()
