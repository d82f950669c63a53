"""Requests generated from our own OpenAPI document (schemathesis) never get a 5xx."""

import pytest
from hypothesis import HealthCheck, settings

from commonlm.serve.app import create_app
from tests.procs import LAST_RESORT_S
from tests.serve.conftest import API_KEY, tiny_lm

schemathesis = pytest.importorskip("schemathesis")

schema = schemathesis.openapi.from_dict(create_app(tiny_lm()).openapi())


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=LAST_RESORT_S)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
