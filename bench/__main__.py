"""Run every benchmark: `python -m bench` (or `make bench`)."""

from __future__ import annotations

from bench import fhir_delivery, fhir_ingest, fhir_read, fhir_search, intake, mapping


def main() -> None:
    intake.main()
    mapping.main()
    fhir_read.main()
    fhir_search.main()
    fhir_ingest.main()
    fhir_delivery.main()


if __name__ == "__main__":
    main()
