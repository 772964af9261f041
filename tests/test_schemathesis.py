"""Schemathesis over the live server's own OpenAPI schema: no generated request may get a 5xx.

A real uvicorn server runs over a copy of the shipped models on 127.0.0.1. Every operation of
the schema is run with a bounded number of generated cases (schema-valid and schema-violating),
once with every parameter generated and once per shipped model with the model pinned, so the
generated bodies reach real inference instead of stopping at "no such model". Operations the
app leaves out of its schema (/metrics, /dashboard) are not API operations and are not run.
The figures (cases per operation, statuses, each distinct failure with a curl to repeat it)
are printed and are the assertion message. A last test sends hand-written hostile requests the
schema cannot describe (headers it does not declare, non-standard JSON, values at float edges).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from http_helpers import ServerProcess, copy_shipped, start_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, BaseSchema, GenerationMode, Response
from schemathesis import Case as AnyCase
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

Operation = APIOperation[Any, Any, Any, Any]
Case = AnyCase[Operation]

MODELS = ("digits", "toy-regression")
MAX_EXAMPLES = 40  # generated cases per operation, parameter set and generation mode
TIME_BUDGET_S = 300.0  # the whole run; cases left when it is spent are counted and fail the test
REQUEST_TIMEOUT_S = 30.0
# Unloading takes the shipped models away from every later operation: it runs last.
LAST = "/unload"
CASES = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same cases on every run
    database=None,
    deadline=None,  # response times are the server's business here, not Hypothesis's
    phases=[Phase.explicit, Phase.generate],  # failures are recorded, never raised: no shrinking
    suppress_health_check=list(HealthCheck),  # slow or filtered generation is not a finding
)


@dataclass(frozen=True)
class Series:
    """One bounded series of cases: an operation, the path parameters pinned, a mode."""

    operation: Operation
    pinned: dict[str, str]
    mode: GenerationMode

    @property
    def label(self) -> str:
        """E.g. 'POST /v1/models/{name}/predict [name=digits] negative'."""
        pins = "".join(f" [{k}={v}]" for k, v in self.pinned.items())
        return f"{self.operation.label}{pins} {self.mode.value}"


@dataclass
class Finding:
    """A distinct failure: how often it happened and the first request that showed it."""

    count: int
    curl: str
    detail: str


@dataclass
class Tally:
    """What a run generated and saw, by series; distinct findings keyed by what they are."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    findings: dict[tuple[str, ...], Finding] = field(default_factory=dict)
    nothing_to_generate: list[str] = field(default_factory=list)
    cut_by_time: int = 0
    own_deadline_504: int = 0  # 504 answers to a request that set its own deadline: by design

    def record(self, series: Series, status: int) -> None:
        """Count one case of `series` and its response status."""
        self.cases[series.label] += 1
        self.statuses.setdefault(series.label, Counter())[status] += 1

    def find(self, key: tuple[str, ...], case: Case, base_url: str, detail: str) -> None:
        """Count a failure; the first of each distinct kind keeps its curl and detail."""
        if key in self.findings:
            self.findings[key].count += 1
        else:
            self.findings[key] = Finding(1, case.as_curl_command(base_url=base_url), detail)

    def assert_clean(self, title: str, server_log: str) -> None:
        """Print the report; fail unless cases ran, none was found, and none was cut by time."""
        report = self.report(title, server_log)
        print(report)
        assert sum(self.cases.values()) > 0
        assert not self.findings, report
        assert self.cut_by_time == 0, report

    def report(self, title: str, server_log: str) -> str:
        """The figures: totals, one line per series, each distinct finding in full."""
        total = sum(self.cases.values())
        count = sum(f.count for f in self.findings.values())
        lines = [
            f"{title}: {total} cases in {len(self.cases)} series, {count} failing cases, "
            f"{len(self.findings)} distinct, {self.cut_by_time} cases cut by the time budget, "
            f"{self.own_deadline_504} answered 504 to their own deadline (by design, not failures)",
        ]
        for label, n in self.cases.items():
            statuses = ", ".join(f"{s}: {c}" for s, c in sorted(self.statuses[label].items()))
            lines.append(f"  {n:4d}  {label}  ({statuses})")
        if self.nothing_to_generate:
            lines.append("  no cases possible (nothing in the operation to generate or violate):")
            lines += [f"        {label}" for label in self.nothing_to_generate]
        for key, finding in self.findings.items():
            lines += [f"\n{' | '.join(key)}  (x{finding.count})", finding.curl, finding.detail]
        if self.findings:
            lines += ["\nserver log (tail):", server_log[-4000:]]
        return "\n".join(lines)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A fresh uvicorn server on 127.0.0.1 over copies of the shipped models (one per test)."""
    repository = copy_shipped(tmp_path / "models", *MODELS)
    process = start_server(repository, tmp_path / "server.log")
    try:
        yield process
    finally:
        process.stop()


def live_schema(server: ServerProcess) -> BaseSchema:
    """The schema the server publishes (fetched without any proxy from the environment)."""
    with httpx.Client(base_url=server.url, trust_env=False, timeout=REQUEST_TIMEOUT_S) as client:
        response = client.get("/openapi.json")
        response.raise_for_status()
        return schemathesis.openapi.from_dict(response.json())


def model_versions(server: ServerProcess) -> dict[str, str]:
    """The version each shipped model serves, to pin `{version}` with `{name}`."""
    with httpx.Client(base_url=server.url, trust_env=False, timeout=REQUEST_TIMEOUT_S) as client:
        return {m: str(client.get(f"/v2/models/{m}").json()["versions"][-1]) for m in MODELS}


def all_series(schema: BaseSchema, versions: dict[str, str]) -> list[Series]:
    """Every operation (an invalid one fails here, loudly), pinned per model, in both modes."""
    operations: list[Operation] = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise AssertionError(
                f"the schema has an operation schemathesis cannot use: {result.err()}"
            )
        operations.append(result.ok())
    operations.sort(key=lambda op: op.path.endswith(LAST))  # stable: schema order otherwise
    series: list[Series] = []
    for operation in operations:
        pins: list[dict[str, str]] = [{}]
        if "{name}" in operation.path:
            for model, version in versions.items():
                pin = {"name": model}
                if "{version}" in operation.path:
                    pin["version"] = version
                pins.append(pin)
        for pinned in pins:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                series.append(Series(operation, pinned, mode))
    return series


Check = Callable[[Series, Case, Response], None]


def run_series(
    series: Series,
    server: ServerProcess,
    session: requests.Session,
    tally: Tally,
    check: Check,
    give_up: float,
) -> None:
    """Send one series' generated cases (at most MAX_EXAMPLES) and `check` each response."""
    strategy = series.operation.as_strategy(
        generation_mode=series.mode, path_parameters=series.pinned or None
    )

    @CASES
    @given(case=strategy)
    def send(case: Case) -> None:
        if time.monotonic() > give_up:
            tally.cut_by_time += 1
            return
        response = case.call(base_url=server.url, session=session, timeout=REQUEST_TIMEOUT_S)
        tally.record(series, response.status_code)
        check(series, case, response)

    try:
        send()
    except Unsatisfiable:  # e.g. negative cases of an operation without parameters or body
        tally.nothing_to_generate.append(series.label)


def run_all(server: ServerProcess, tally: Tally, check: Check) -> None:
    """Every series of the live schema against the server, within TIME_BUDGET_S."""
    series_list = all_series(live_schema(server), model_versions(server))
    give_up = time.monotonic() + TIME_BUDGET_S
    with requests.Session() as session:
        session.trust_env = False  # 127.0.0.1 only: no proxy from the environment
        for series in series_list:
            run_series(series, server, session, tally, check, give_up)


def sets_a_deadline(case: Case) -> bool:
    """Whether the request asked for its own deadline (a 504 is then the answer it asked for)."""
    body = case.body if isinstance(case.body, dict) else {}
    parameters = body.get("parameters")
    headers = {name.lower() for name in case.headers or {}}
    return (
        "timeout_ms" in body
        or (isinstance(parameters, dict) and "timeout" in parameters)
        or "x-request-timeout-ms" in headers
    )


def test_no_generated_request_gets_a_server_error(server: ServerProcess) -> None:
    tally = Tally()

    def no_5xx(series: Series, case: Case, response: Response) -> None:
        if response.status_code == 504 and sets_a_deadline(case):
            tally.own_deadline_504 += 1
        elif response.status_code >= 500:
            key = (series.operation.label, str(response.status_code), response.text[:200])
            tally.find(key, case, server.url, f"-> {response.status_code} {response.text[:500]}")

    run_all(server, tally, no_5xx)
    tally.assert_clean("5xx", server.output())


def test_responses_conform_to_the_schema(server: ServerProcess) -> None:
    """Status codes the schema documents, and bodies that match the documented schema."""
    tally = Tally()
    checks: list[Any] = [status_code_conformance, response_schema_conformance]

    def conforms(series: Series, case: Case, response: Response) -> None:
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            for failure in group.exceptions:
                key = (series.operation.label, failure.title, str(response.status_code))
                detail = f"-> {response.status_code} {response.text[:300]}\n{failure.message}"
                tally.find(key, case, server.url, detail[:1500])

    run_all(server, tally, conforms)
    tally.assert_clean("schema conformance", server.output())


# -- what the schema cannot describe -----------------------------------------------------------

OIP = "/v2/models/toy-regression/infer"
PREDICT = "/v1/models/toy-regression/predict"
JSON = {"content-type": "application/json"}
HCL = "Inference-Header-Content-Length"
ONE_ROW = b'{"inputs":[{"name":"input","shape":[1,1],"datatype":"FP32","data":[1.0]}]}'
LONG_STRING = b'["' + b"b" * 20_000 + b'"' + b',"a"' * 19_999 + b"]"


def oip_input(shape: str, datatype: str = '"FP32"', data: bytes = b"[1.0]") -> bytes:
    """An OIP JSON body with one input 'input' written verbatim (any JSON, even invalid)."""
    head = f'{{"inputs":[{{"name":"input","shape":{shape},"datatype":{datatype},"data":'.encode()
    return head + data + b"}]}"


HOSTILE: list[tuple[str, str, bytes | None, dict[str, Any]]] = [
    # (what, path, body (None: GET), headers)
    ("header length: a Latin-1 superscript digit", OIP, ONE_ROW, {HCL: b"\xb2"}),
    ("header length: larger than any body", OIP, ONE_ROW, {HCL: b"9" * 30}),
    ("header length: negative", OIP, ONE_ROW, {HCL: b"-1"}),
    ("header length: empty", OIP, ONE_ROW, {HCL: b""}),
    ("header length 0 before raw garbage", OIP, bytes(range(256)), {HCL: b"0"}),
    ("an empty tensor too large for float64", OIP, oip_input("[0,1152921504606846976]", data=b"[]"),
     JSON),
    ("65 dimensions", OIP, oip_input("[" + ",".join(["1"] * 65) + "]"), JSON),
    ("strings in INT32 data", OIP, oip_input("[1,1]", '"INT32"', b'["a"]'), JSON),
    ("one long string among many", OIP, oip_input("[20000]", data=LONG_STRING), JSON),
    ("a list as the datatype", OIP, oip_input("[1,1]", "[1]"), JSON),
    ("OIP interval level next to 1", OIP,
     ONE_ROW[:-1] + b',"parameters":{"interval_levels":[0.9999999999999999]}}', JSON),
    ("NaN row", PREDICT, b'{"rows": [[NaN]]}', JSON),
    ("infinite row", PREDICT, b'{"rows": [[-Infinity]]}', JSON),
    ("row at the float64 limit", PREDICT, b'{"rows": [[1e308]]}', JSON),
    ("interval level next to 1", PREDICT,
     b'{"rows": [[1.0]], "interval_levels": [0.9999999999999999]}', JSON),
    ("interval level next to 0", PREDICT, b'{"rows": [[1.0]], "interval_levels": [5e-324]}', JSON),
    ("target at the float64 limit", "/v1/models/toy-regression/evaluate",
     b'{"rows": [[1.0]], "targets": [1e308]}', JSON),
    ("timeout header: a superscript digit", PREDICT, b'{"rows": [[1.0]]}',
     {**JSON, "X-Request-Timeout-Ms": b"\xb2"}),
    ("timeout header: beyond float range", PREDICT, b'{"rows": [[1.0]]}',
     {**JSON, "X-Request-Timeout-Ms": b"1e400"}),
    ("recent since: beyond float range", "/v1/models/toy-regression/recent?since=1e400", None, {}),
]  # fmt: skip


def test_hostile_requests_outside_the_schema_get_no_server_error(server: ServerProcess) -> None:
    """Each gets a 4xx or a 200, one connection each: a 5xx may close its connection."""
    statuses: dict[str, int] = {}
    failures: list[str] = []
    for what, path, body, headers in HOSTILE:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=REQUEST_TIMEOUT_S) as c:
            if body is None:
                response = c.get(path, headers=headers)
            else:
                response = c.post(path, content=body, headers=headers)
        statuses[what] = response.status_code
        if response.status_code >= 500:
            method = "GET" if body is None else "POST"
            failures.append(
                f"{what}: {method} {path} -> {response.status_code} {response.text[:200]}"
            )
    report = "\n".join(
        [f"hostile requests: {len(HOSTILE)} sent, {len(failures)} answered 5xx", *failures]
        + [f"  {code}  {what}" for what, code in statuses.items()]
    )
    print(report)
    assert not failures, report + "\n\nserver log (tail):\n" + server.output()[-4000:]
