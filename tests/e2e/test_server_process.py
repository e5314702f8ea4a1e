"""The service as a running process: writes over HTTP, and a kill -9 in the middle of an import."""

from __future__ import annotations

import httpx
import orjson
import pytest
from sqlalchemy import text

from service.store.db import Database
from tests.e2e.conftest import Server
from tests.factory import clinic, path_of

pytestmark = pytest.mark.e2e


def test_records_round_trip_over_a_real_socket(server: Server) -> None:
    records = clinic()
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        for record in records.records():
            path = path_of(record)
            assert client.put(path, json=record).status_code == 201
            assert client.put(path, json=record).headers["x-record-outcome"] == "unchanged"
            assert client.get(path).json()["external_id"] == record["external_id"]
        bad = records.session | {"external_id": "S-bad-1", "weight_kg": 5}
        response = client.put("/api/v1/sessions/S-bad-1", json=bad)
        assert response.status_code == 422
        assert response.json()["errors"][0]["path"] == "weight_kg"
        assert client.get("/api/v1/sessions/S-bad-1").status_code == 404


def test_kill_during_import_keeps_every_acknowledged_line_and_nothing_half_written(
    server: Server, e2e_database_url: str
) -> None:
    clinics = [clinic() for _ in range(400)]
    lines = [orjson.dumps(record) for c in clinics for record in c.records()]
    acknowledged: list[dict[str, object]] = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        try:
            with client.stream(
                "POST",
                "/api/v1/import",
                content=b"\n".join(lines),
                headers={"Accept": "application/x-ndjson", "Content-Type": "application/x-ndjson"},
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    result = orjson.loads(line)
                    acknowledged.append(result)
                    if len(acknowledged) >= 300:
                        server.kill()
                        break
        except httpx.TransportError:
            pass  # the connection dies with the server; what was acknowledged is what counts
    assert len(acknowledged) >= 300
    assert "summary" not in acknowledged[-1], "the import finished before the kill"

    server.start()
    decoded = [orjson.loads(line) for line in lines]
    sent = {(record["kind"], record["external_id"]) for record in decoded}
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        for result in acknowledged:
            assert result["status"] == "created"
            read = client.get(path_of(result))
            assert read.status_code == 200, result
            assert read.json()["external_id"] == result["external_id"]

    # Nothing half-written: every stored record has exactly its history, and is a record sent.
    database = Database(e2e_database_url)
    with database.engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT r.kind, r.external_id, r.version, count(c.id) FROM records r "
                "LEFT JOIN record_changes c ON c.kind = r.kind AND c.external_id = r.external_id "
                "GROUP BY r.kind, r.external_id, r.version"
            )
        ).all()
        orphans = connection.execute(
            text(
                "SELECT count(*) FROM record_changes c WHERE NOT EXISTS (SELECT 1 FROM records r "
                "WHERE r.kind = c.kind AND r.external_id = c.external_id)"
            )
        ).scalar_one()
    database.dispose()
    ours = [row for row in rows if (row[0], row[1]) in sent]
    assert len(ours) >= len(acknowledged)
    assert len(ours) < len(lines), "everything was stored: the kill came too late to test"
    assert all(version == 1 and changes == 1 for _, _, version, changes in ours)
    assert orphans == 0
