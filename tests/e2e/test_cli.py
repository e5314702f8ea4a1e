"""The `infusion-bridge` command as a user runs it: demo export, map, validate, import."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.e2e.conftest import cli, server_env
from tests.fhir_check import assert_valid_r4

pytestmark = pytest.mark.e2e

AS_OF = "2026-11-23"


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    env = server_env(f"sqlite:///{folder / 'unused.db'}")
    first, second = folder / "first.ndjson", folder / "second.ndjson"
    cli("demo", "--as-of", AS_OF, "--export", str(first), env=env)
    cli("demo", "--as-of", AS_OF, "--export", str(second), env=env)
    assert first.read_bytes() == second.read_bytes(), "the same seed gave different data"
    return first


def test_every_resource_of_the_demo_clinic_is_valid_r4(demo_file: Path, tmp_path: Path) -> None:
    env = server_env(f"sqlite:///{tmp_path / 'unused.db'}")
    mapped = cli("map", str(demo_file), env=env)
    bundle = orjson.loads(mapped.stdout)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    entries = bundle["entry"]
    assert len(entries) > 5000
    types = {entry["resource"]["resourceType"] for entry in entries}
    assert types >= {
        "Patient",
        "Practitioner",
        "Organization",
        "Condition",
        "CarePlan",
        "Goal",
        "MedicationRequest",
        "Encounter",
        "MedicationAdministration",
        "Observation",
        "QuestionnaireResponse",
        "AdverseEvent",
    }
    for entry in entries:
        resource = entry["resource"]
        assert entry["request"] == {
            "method": "PUT",
            "url": f"{resource['resourceType']}/{resource['id']}",
        }
        assert_valid_r4(resource)
    bundle_file = tmp_path / "bundle.json"
    bundle_file.write_text(mapped.stdout)
    checked = cli("validate", str(bundle_file), env=env, check=False)
    outcome = orjson.loads(checked.stdout)
    errors = [i for i in outcome["issue"] if i["severity"] == "error"]
    assert (checked.returncode, errors) == (0, [])


def test_map_writes_ndjson_and_refuses_invalid_records(demo_file: Path, tmp_path: Path) -> None:
    env = server_env(f"sqlite:///{tmp_path / 'unused.db'}")
    lines = cli("map", "--ndjson", str(demo_file), env=env).stdout.splitlines()
    assert all(orjson.loads(line)["resourceType"] for line in lines)
    broken = tmp_path / "broken.ndjson"
    first = orjson.loads(demo_file.read_bytes().splitlines()[0])
    broken.write_bytes(orjson.dumps(first | {"role": "surgeon"}) + b"\n")
    refused = cli("map", str(broken), env=env, check=False)
    assert refused.returncode == 1
    assert "role" in refused.stderr


def test_validate_reports_what_is_wrong_and_where(tmp_path: Path) -> None:
    env = server_env(f"sqlite:///{tmp_path / 'unused.db'}")
    resource = {
        "resourceType": "MedicationAdministration",
        "id": "x",
        "status": "completed",
        "medicationCodeableConcept": {"text": "ketamine"},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2026-10-05T09:00:00-04:00",
        "dosage": {"text": "34 mg"},
    }
    path = tmp_path / "ma.json"
    path.write_bytes(orjson.dumps(resource))
    result = cli("validate", str(path), env=env, check=False)
    assert result.returncode == 1
    outcome = orjson.loads(result.stdout)
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = " ".join(i["diagnostics"] for i in outcome["issue"])
    assert "mad-1" in diagnostics


def test_import_then_reimport_changes_nothing(demo_file: Path, tmp_path: Path) -> None:
    env = server_env(f"sqlite:///{tmp_path / 'clinic.db'}")
    cli("migrate", env=env)
    first = orjson.loads(cli("import", str(demo_file), env=env).stdout)
    assert first["rejected"] == 0
    assert first["created"] == first["lines"] > 500
    again = orjson.loads(cli("import", str(demo_file), env=env).stdout)
    assert again["unchanged"] == again["lines"]
