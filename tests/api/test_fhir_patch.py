"""FHIRPath Patch (a Parameters body, application/fhir+json) through the ASGI app, on SQLite and
PostgreSQL.

Every operation type, the choice and repeating elements a value does not spell out, every error
as a whole OperationOutcome, If-Match, Bundle entries, and a CarePlan patched into its course.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient

from mappings.context import resource_id
from tests.api.conftest import SecureApi
from tests.api.test_fhir_write import (
    assert_outcome,
    assert_written,
    load_clinic,
    observation,
    outcome,
    without_server_meta,
)
from tests.factory import path_of
from tests.fhir_check import r4_errors

FHIR = {"Content-Type": "application/fhir+json"}


def operation(kind: str, path: str, **parts: Any) -> dict[str, Any]:
    """One `operation` parameter: `name` a string, index/source/destination integers, `value`
    the part's own keys (`{"valueCode": ...}` or `{"part": [...]}`)."""
    out: list[dict[str, Any]] = [
        {"name": "type", "valueCode": kind},
        {"name": "path", "valueString": path},
    ]
    for name, value in parts.items():
        if name == "name":
            out.append({"name": "name", "valueString": value})
        elif name in ("index", "source", "destination"):
            out.append({"name": name, "valueInteger": value})
        else:
            out.append({"name": name, **value})
    return {"name": "operation", "part": out}


def parameters(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(operations)}


def refused(index: int, label: str, diagnostics: str) -> dict[str, Any]:
    """The 422 of an operation that does not apply."""
    return outcome(
        "processing",
        f"operation {index} ({label}): {diagnostics}",
        f"Parameters.parameter[{index}]",
    )


def malformed(index: int, diagnostics: str) -> dict[str, Any]:
    """The 400 of a malformed operation."""
    return outcome("invalid", f"operation {index}: {diagnostics}", f"Parameters.parameter[{index}]")


def text(value: str) -> dict[str, Any]:
    """An Annotation value built from parts."""
    return {"part": [{"name": "text", "valueString": value}]}


def created_observation(client: TestClient, **extra: Any) -> tuple[str, dict[str, Any]]:
    created = client.post("/fhir/Observation", json=observation(**extra)).json()
    return f"/fhir/Observation/{created['id']}", created


# --- the operations -----------------------------------------------------------------------------


def test_every_operation_type(client: TestClient) -> None:
    url, created = created_observation(client)
    body = parameters(
        operation("replace", "Observation.status", value={"valueCode": "amended"}),
        # `note` repeats in R4: the first added becomes a list of one.
        operation("add", "Observation", name="note", value=text("first")),
        operation("add", "Observation", name="note", value=text("second")),
        operation("insert", "Observation.note", index=0, value=text("zero")),
        operation("move", "Observation.note", source=0, destination=2),
        operation("delete", "Observation.note.where(text = 'first')"),
        operation("replace", "Observation.value.value", value={"valueDecimal": 75}),
        # A complex value from parts: CodeableConcept.coding repeats, interpretation too.
        operation(
            "add",
            "Observation",
            name="interpretation",
            value={
                "part": [
                    {
                        "name": "coding",
                        "part": [
                            {
                                "name": "system",
                                "valueUri": "http://terminology.hl7.org/CodeSystem/"
                                "v3-ObservationInterpretation",
                            },
                            {"name": "code", "valueCode": "N"},
                        ],
                    }
                ]
            },
        ),
        operation("delete", "Observation.method"),  # nothing there: nothing to do
    )
    patched = assert_written(
        client.patch(url, json=body, headers=FHIR | {"If-Match": 'W/"1"'}), 200, 2
    )
    expected = created | {
        "status": "amended",
        "note": [{"text": "second"}, {"text": "zero"}],
        "valueQuantity": created["valueQuantity"] | {"value": 75},
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/"
                        "v3-ObservationInterpretation",
                        "code": "N",
                    }
                ]
            }
        ],
    }
    assert without_server_meta(patched) == without_server_meta(expected)
    assert client.get(url).json() == patched


def test_a_choice_element_takes_the_type_of_its_value(client: TestClient) -> None:
    url, created = created_observation(client)
    patched = assert_written(
        client.patch(
            url,
            json=parameters(
                operation("replace", "Observation.value", value={"valueString": "regular"}),
                operation("delete", "Observation.effective"),
                operation("add", "Observation", name="effective", value={"valueDateTime": "2026"}),
            ),
            headers=FHIR,
        ),
        200,
        2,
    )
    expected = {k: v for k, v in created.items() if k not in ("valueQuantity", "effectiveDateTime")}
    assert without_server_meta(patched) == without_server_meta(
        expected | {"valueString": "regular", "effectiveDateTime": "2026"}
    )
    # Without a value, `effective` was added; with one, add refuses, by either name.
    assert_outcome(
        client.patch(
            url,
            json=parameters(
                operation("add", "Observation", name="valueBoolean", value={"valueBoolean": True})
            ),
            headers=FHIR,
        ),
        422,
        refused(
            0,
            "add Observation",
            "value is already there: add appends to a list, replace changes a value",
        ),
    )
    assert_outcome(
        client.patch(
            url,
            json=parameters(
                operation("add", "Observation", name="effective", value={"valuePeriod": {}})
            ),
            headers=FHIR,
        ),
        422,
        refused(
            0,
            "add Observation",
            "effective is already there: add appends to a list, replace changes a value",
        ),
    )
    assert_outcome(
        client.patch(
            url,
            json=parameters(
                operation("replace", "Observation.value", value={"valueAddress": {"city": "X"}})
            ),
            headers=FHIR,
        ),
        422,
        refused(0, "replace Observation.value", "value cannot be of type Address"),
    )


def test_primitive_lists_keep_their_extensions_aligned(client: TestClient) -> None:
    practitioner = {
        "resourceType": "Practitioner",
        "name": [
            {
                "family": "Okafor",
                "given": ["Ada", "Nkem"],
                "_given": [None, {"extension": [{"url": "urn:x:nick", "valueBoolean": True}]}],
            }
        ],
    }
    created = client.post("/fhir/Practitioner", json=practitioner).json()
    url = f"/fhir/Practitioner/{created['id']}"
    moved = assert_written(
        client.patch(
            url,
            json=parameters(
                operation("move", "Practitioner.name.given", source=1, destination=0),
                operation("insert", "Practitioner.name.given", index=2, value={"valueString": "O"}),
            ),
            headers=FHIR,
        ),
        200,
        2,
    )
    nick = {"extension": [{"url": "urn:x:nick", "valueBoolean": True}]}
    assert moved["name"] == [
        {"family": "Okafor", "given": ["Nkem", "Ada", "O"], "_given": [nick, None, None]}
    ]
    deleted = assert_written(
        client.patch(
            url,
            json=parameters(operation("delete", "Practitioner.name.given[0]")),
            headers=FHIR,
        ),
        200,
        3,
    )
    assert deleted["name"] == [{"family": "Okafor", "given": ["Ada", "O"]}]


def test_extension_values_are_patched_where_they_are(client: TestClient) -> None:
    url, created = created_observation(
        client, extension=[{"url": "urn:x:device", "valueString": "cuff A"}]
    )
    patched = assert_written(
        client.patch(
            url,
            json=parameters(
                operation(
                    "replace",
                    "Observation.extension('urn:x:device').value",
                    value={"valueString": "cuff B"},
                )
            ),
            headers=FHIR,
        ),
        200,
        2,
    )
    assert patched["extension"] == [{"url": "urn:x:device", "valueString": "cuff B"}]
    removed = assert_written(
        client.patch(
            url,
            json=parameters(operation("delete", "Observation.extension('urn:x:device')")),
            headers=FHIR,
        ),
        200,
        3,
    )
    assert without_server_meta(removed) == without_server_meta(
        {k: v for k, v in created.items() if k != "extension"}
    )


def test_a_contained_resource_is_added_and_referenced(client: TestClient) -> None:
    url, created = created_observation(client)
    device = {"resourceType": "Device", "id": "cuff", "manufacturer": "Acme"}
    body = parameters(
        {
            "name": "operation",
            "part": [
                {"name": "type", "valueCode": "add"},
                {"name": "path", "valueString": "Observation"},
                {"name": "name", "valueString": "contained"},
                {"name": "value", "resource": device},
            ],
        },
        operation(
            "add", "Observation", name="device", value={"valueReference": {"reference": "#cuff"}}
        ),
        operation(
            "replace",
            "Observation.contained.ofType(Device).manufacturer",
            value={"valueString": "Acme Co"},
        ),
    )
    patched = assert_written(client.patch(url, json=body, headers=FHIR), 200, 2)
    assert without_server_meta(patched) == without_server_meta(
        created
        | {"contained": [device | {"manufacturer": "Acme Co"}], "device": {"reference": "#cuff"}}
    )


def test_hostile_patches_never_give_a_500(client: TestClient) -> None:
    url, created = created_observation(client)
    deep: dict[str, Any] = {"name": "text", "valueString": "x"}
    for _ in range(80):
        deep = {"name": "extension", "part": [deep]}
    bodies: list[Any] = [
        parameters(operation("replace", "Observation.status" * 200, value={"valueCode": "x"})),
        parameters(operation("replace", "Observation.(((", value={"valueCode": "x"})),
        parameters(operation("replace", "%nosuchvariable", value={"valueCode": "x"})),
        parameters(operation("replace", "Observation.status + 1", value={"valueCode": "x"})),
        parameters(operation("add", "Observation", name="note", value=deep)),
        parameters(operation("add", "Observation", name="note", value={"part": "text"})),
        parameters(operation("add", "Observation", name="note", value={"part": [7]})),
        parameters(operation("replace", "Observation.status", value={"valueCode": "x\u0000"})),
        {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": "type"}]},
        {"resourceType": "Parameters", "parameter": [7, None]},
    ]
    for body in bodies:
        answer = client.patch(url, json=body, headers=FHIR)
        assert answer.status_code in (400, 422), (body, answer.text)
        assert answer.json()["resourceType"] == "OperationOutcome"
    assert client.get(url).json() == created


# --- errors -----------------------------------------------------------------------------------


def test_malformed_patches_are_400(client: TestClient) -> None:
    url, _ = created_observation(client)
    status = operation("replace", "Observation.status", value={"valueCode": "amended"})
    cases: list[tuple[Any, dict[str, Any]]] = [
        (
            [{"op": "replace", "path": "/status", "value": "amended"}],
            outcome("invalid", "a FHIRPath Patch (application/fhir+json) is a Parameters resource"),
        ),
        (
            {"resourceType": "Parameters", "parameter": {"name": "operation"}},
            outcome("invalid", "Parameters.parameter is a list", "Parameters.parameter"),
        ),
        (
            parameters(status, {"name": "op", "part": []}),
            malformed(1, "each parameter of a FHIRPath Patch is named operation"),
        ),
        (
            parameters(operation("jump", "Observation.status")),
            malformed(
                0, "the type part is a valueCode, one of add | insert | delete | replace | move"
            ),
        ),
        (
            parameters(operation("add", "Observation", value={"valueCode": "x"})),
            malformed(0, "add needs the part name"),
        ),
        (
            parameters(operation("move", "Observation.note", source=0)),
            malformed(0, "move needs the part destination"),
        ),
        (
            parameters(operation("delete", "Observation.status", value={"valueCode": "x"})),
            malformed(0, "delete takes no part value"),
        ),
        (
            parameters(
                {
                    "name": "operation",
                    "part": [*status["part"], {"name": "path", "valueString": "Observation.id"}],
                }
            ),
            malformed(0, "the part path is given twice"),
        ),
        (
            parameters(operation("insert", "Observation.note", index=-1, value=text("x"))),
            malformed(0, "the index part is a valueInteger of 0 or more"),
        ),
        (
            parameters(operation("add", "Observation", name="Note", value=text("x"))),
            malformed(0, "'Note' is not an element name"),
        ),
        (
            parameters(operation("replace", "", value={"valueCode": "x"})),
            malformed(0, "the path part is a valueString holding a FHIRPath expression"),
        ),
        (
            parameters(
                operation(
                    "replace", "Observation.status", value={"valueCode": "x", "valueString": "y"}
                )
            ),
            malformed(
                0,
                "the part value has one value[x], or a resource, or parts that make a complex "
                "value",
            ),
        ),
        (
            parameters(operation("delete", "Observation.subject.resolve().name")),
            malformed(0, "the path may not resolve() references: a patch changes one resource"),
        ),
        (
            parameters(operation("delete", "Observation.status.nosuchfunction()")),
            malformed(
                0,
                "'Observation.status.nosuchfunction()' is not a FHIRPath expression this server "
                "can evaluate",
            ),
        ),
    ]
    for body, expected in cases:
        assert_outcome(client.patch(url, json=body, headers=FHIR), 400, expected)
    assert_outcome(
        client.patch(url, content=b"status=amended", headers={"Content-Type": "text/plain"}),
        415,
        outcome(
            "not-supported",
            "PATCH takes a JSON Patch (application/json-patch+json) or a FHIRPath Patch "
            "(application/fhir+json), not text/plain",
        ),
    )
    assert client.get(url).json()["meta"]["versionId"] == "1"


def test_operations_that_do_not_apply_are_422(client: TestClient) -> None:
    url, created = created_observation(client, note=[{"text": "a"}, {"text": "b"}])
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (
            operation(
                "replace", "Observation.issued", value={"valueInstant": "2026-01-01T00:00:00Z"}
            ),
            refused(0, "replace Observation.issued", "the path selects nothing"),
        ),
        (
            operation("replace", "Observation.note.text", value={"valueString": "x"}),
            refused(
                0,
                "replace Observation.note.text",
                "the path selects 2 elements; replace acts on exactly one",
            ),
        ),
        (
            operation("delete", "Observation.note"),
            refused(
                0,
                "delete Observation.note",
                "the path selects 2 elements; delete acts on exactly one",
            ),
        ),
        (
            operation("add", "Observation.note", name="text", value={"valueString": "x"}),
            refused(
                0, "add Observation.note", "the path selects 2 elements; add acts on exactly one"
            ),
        ),
        (
            operation("add", "Observation", name="status", value={"valueCode": "final"}),
            refused(
                0,
                "add Observation",
                "status is already there: add appends to a list, replace changes a value",
            ),
        ),
        (
            operation("add", "Observation.status", name="id", value={"valueString": "x"}),
            refused(
                0,
                "add Observation.status",
                "the path selects a primitive, which has no elements to add to",
            ),
        ),
        (
            operation("insert", "Observation.note", index=3, value=text("x")),
            refused(0, "insert Observation.note", "index 3 is past the end of a list of 2"),
        ),
        (
            operation("insert", "Observation.code", index=0, value=text("x")),
            refused(0, "insert Observation.code", "the path selects no list"),
        ),
        (
            operation("insert", "Observation.method", index=0, value=text("x")),
            refused(0, "insert Observation.method", "the path selects nothing"),
        ),
        (
            operation("move", "Observation.note", source=2, destination=0),
            refused(0, "move Observation.note", "source 2 is not in a list of 2"),
        ),
        (
            operation("move", "Observation.note | Observation.identifier", source=0, destination=1),
            refused(
                0,
                "move Observation.note | Observation.identifier",
                "the path selects items of more than one list",
            ),
        ),
        (
            operation("replace", "'constant'", value={"valueString": "x"}),
            refused(
                0,
                "replace 'constant'",
                "the path selects a value that is not an element of the resource",
            ),
        ),
        (
            operation("replace", "Observation", value={"valueString": "x"}),
            refused(
                0, "replace Observation", "the resource itself is replaced with an update (PUT)"
            ),
        ),
        (
            operation("delete", "Observation"),
            refused(0, "delete Observation", "the resource itself is deleted with a DELETE"),
        ),
        (
            operation("add", "Observation", name="effective", value=text("x")),
            refused(
                0, "add Observation", "effective is a choice of types: give the value as value[x]"
            ),
        ),
        (
            operation("replace", "Observation.id", value={"valueId": "another"}),
            outcome("processing", "the patch changes the id", "Observation.id"),
        ),
    ]
    for patch, expected in cases:
        # A first operation that applies: a later one failing leaves nothing written.
        first = operation("replace", "Observation.status", value={"valueCode": "amended"})
        body = parameters(first, patch)
        response = client.patch(url, json=body, headers=FHIR)
        if expected["issue"][0].get("expression", [""])[0].startswith("Parameters"):
            expected = {
                "resourceType": "OperationOutcome",
                "issue": [
                    issue
                    | {
                        "diagnostics": issue["diagnostics"].replace("operation 0", "operation 1"),
                        "expression": ["Parameters.parameter[1]"],
                    }
                    for issue in expected["issue"]
                ],
            }
        assert_outcome(response, 422, expected)
    # A result that is no valid Observation is refused by validation, with its path.
    invalid = client.patch(
        url,
        json=parameters(operation("replace", "Observation.status", value={"valueCode": "done"})),
        headers=FHIR,
    )
    assert invalid.status_code == 422, invalid.text
    issues = invalid.json()["issue"]
    assert [issue["expression"] for issue in issues] == [["Observation.status"]]
    assert r4_errors(invalid.json()) == []
    assert client.get(url).json() == created


def test_not_found_gone_and_if_match(client: TestClient) -> None:
    url, created = created_observation(client)
    status = parameters(operation("replace", "Observation.status", value={"valueCode": "amended"}))
    assert_written(client.patch(url, json=status, headers=FHIR | {"If-Match": 'W/"1"'}), 200, 2)
    assert_outcome(
        client.patch(url, json=status, headers=FHIR | {"If-Match": 'W/"1"'}),
        412,
        outcome(
            "conflict",
            f"Observation/{created['id']}: If-Match asked for version 1, it is at version 2",
        ),
    )
    assert client.get(url).json()["meta"]["versionId"] == "2"
    missing = f"nope-{uuid.uuid4().hex[:8]}"
    assert_outcome(
        client.patch(f"/fhir/Observation/{missing}", json=status, headers=FHIR),
        404,
        outcome("not-found", f"Observation/{missing} is not known"),
    )
    assert client.delete(url).status_code == 204
    assert_outcome(
        client.patch(url, json=status, headers=FHIR),
        410,
        outcome("deleted", f"Observation/{created['id']} was deleted"),
    )


# --- Bundles ----------------------------------------------------------------------------------


def test_patch_entries_in_transactions_and_batches(client: TestClient) -> None:
    _, created = created_observation(client)
    target = f"Observation/{created['id']}"
    new = uuid.uuid4().hex
    sent = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{new}",
                "resource": observation(),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                # The reference to the new entry is rewritten inside the Parameters too.
                "resource": parameters(
                    operation(
                        "add",
                        "Observation",
                        name="hasMember",
                        value={"valueReference": {"reference": f"urn:uuid:{new}"}},
                    )
                ),
                "request": {"method": "PATCH", "url": target, "ifMatch": 'W/"1"'},
            },
        ],
    }
    response = client.post("/fhir", json=sent)
    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert (first["response"]["status"], second["response"]["status"]) == ("201 Created", "200 OK")
    assert second["resource"]["hasMember"] == [
        {"reference": f"Observation/{first['resource']['id']}"}
    ]
    assert second["response"]["etag"] == 'W/"2"'
    # An entry that does not apply rolls the whole transaction back.
    value = uuid.uuid4().hex
    failing = sent | {
        "entry": [
            {
                "resource": observation(identifier=[{"system": "urn:ehr:obs", "value": value}]),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": parameters(
                    operation(
                        "replace",
                        "Observation.issued",
                        value={"valueInstant": "2026-01-01T00:00:00Z"},
                    )
                ),
                "request": {"method": "PATCH", "url": target},
            },
        ]
    }
    assert_outcome(
        client.post("/fhir", json=failing),
        422,
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "diagnostics": f"entry 1 (PATCH {target}): operation 0 (replace "
                    "Observation.issued): the path selects nothing",
                    "expression": ["Bundle.entry[1]", "Parameters.parameter[0]"],
                }
            ],
        },
    )
    search = client.get(f"/fhir/Observation?identifier=urn:ehr:obs|{value}").json()
    assert search.get("entry", []) == []  # the entry before it was not written either
    assert client.get(f"/fhir/{target}").json()["meta"]["versionId"] == "2"
    # In a batch, each entry stands alone.
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": parameters(
                    operation("replace", "Observation.status", value={"valueCode": "amended"})
                ),
                "request": {"method": "PATCH", "url": target},
            },
            {
                "resource": {"resourceType": "Basic"},
                "request": {"method": "PATCH", "url": target},
            },
        ],
    }
    answered = client.post("/fhir", json=batch)
    assert answered.status_code == 200, answered.text
    ok, unsupported = answered.json()["entry"]
    assert ok["resource"]["status"] == "amended"
    assert unsupported["response"] == {
        "status": "415",
        "outcome": outcome(
            "not-supported",
            f"entry 1 (PATCH {target}): a PATCH entry carries a Parameters resource (a FHIRPath "
            "Patch) or a Binary of contentType application/json-patch+json",
            "Bundle.entry[1]",
        ),
    }


# --- record-backed types ------------------------------------------------------------------------


def test_a_care_plan_patched_by_an_ehr_changes_the_course(client: TestClient) -> None:
    records = load_clinic(client)
    course = records.course
    url = f"/fhir/CarePlan/{resource_id('course', course['external_id'], 'CarePlan')}"
    read = client.get(url)
    version = int(read.json()["meta"]["versionId"])
    body = parameters(
        operation("replace", "CarePlan.status", value={"valueCode": "on-hold"}),
        operation("add", "CarePlan", name="note", value=text("paused by the EHR")),
    )
    stored = assert_written(
        client.patch(url, json=body, headers=FHIR | {"If-Match": read.headers["etag"]}),
        200,
        version + 1,
    )
    assert (stored["status"], stored["note"]) == ("on-hold", [{"text": "paused by the EHR"}])
    assert client.get(url).json() == stored
    # The course changed as a PUT of the same CarePlan changes it.
    record = client.get(path_of(course)).json()
    assert (record["status"], record["notes"]) == ("on_hold", ["paused by the EHR"])
    history = client.get(path_of(course) + "/history").json()["items"]
    assert history[-1]["version"] == 2
    # What the course cannot hold is refused, and nothing changes.
    refused_ = client.patch(
        url,
        json=parameters(
            operation(
                "add",
                "CarePlan.activity[1].detail.scheduledTiming.repeat",
                name="dayOfWeek",
                value={"valueCode": "mon"},
            )
        ),
        headers=FHIR,
    )
    assert refused_.status_code == 422, refused_.text
    assert refused_.json()["issue"][0]["code"] == "not-supported"
    assert client.get(url).json() == stored
    assert client.get(path_of(course)).json() == record


def test_the_capability_statement_lists_both_patch_formats(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    assert statement["patchFormat"] == ["application/json-patch+json", "application/fhir+json"]


def test_a_fhirpath_patch_needs_the_update_scope(secure: SecureApi) -> None:
    created = secure.http.post(
        "/fhir/Observation", json=observation(), headers=secure.headers("system/Observation.c")
    )
    assert created.status_code == 201, created.text
    url = f"/fhir/Observation/{created.json()['id']}"
    body = parameters(operation("replace", "Observation.status", value={"valueCode": "amended"}))
    for scope in ("system/Observation.rs", "system/Observation.cd"):
        answer = secure.http.patch(url, json=body, headers=FHIR | secure.headers(scope))
        assert answer.status_code == 403, (scope, answer.text)
    allowed = secure.http.patch(
        url, json=body, headers=FHIR | secure.headers("system/Observation.u")
    )
    assert_written(allowed, 200, 2)
