"""Run every benchmark: `python -m bench` (or `make bench`)."""

from __future__ import annotations

from bench import fhir_read, intake, mapping


def main() -> None:
    intake.main()
    mapping.main()
    fhir_read.main()


if __name__ == "__main__":
    main()
