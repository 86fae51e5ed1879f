"""REST operations with full JSON Schema parameters: headers, query styles, form and multipart
bodies, a whole-schema body, typed path parameters; sent to the loopback stub."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from stub import Stub

from integrations import http
from integrations.config import Settings
from integrations.errors import ConfigError, InvalidParams
from integrations.jobs import resolve
from integrations.services import Attempt, load_services
from integrations.services.http_service import HttpService


def send(service: str, op: str, params: dict[str, Any]) -> http.Response:
    svc, operation = resolve(service, op)
    assert isinstance(svc, HttpService)
    req = svc.request(operation, operation.validate_params(params), Attempt("job"))
    return http.send(svc, req, 65536)


def test_query_styles_headers_and_typed_path_reach_the_server(stub: Stub, key: str) -> None:
    params = {
        "key": key,
        "n": "3",
        "tags": ["a", "b c"],
        "csv": ["x", "y"],
        "piped": [1, 2],
        "filter": {"a": "z"},
        "flag": True,
        "page_size": 10,
        "request_id": "req-1",
    }
    send("tools_rest", "styles", params)
    (hit,) = stub.hits_for(key)
    assert hit.path == f"/echo/{key}/3"
    assert hit.query == {
        "tags": ["a", "b c"],
        "csv": ["x,y"],
        "piped": ["1|2"],
        "filter[a]": ["z"],
        "flag": ["true"],
        "page-size": ["10"],
    }
    assert hit.headers["x-request-id"] == "req-1"


def test_a_header_value_with_a_line_break_is_refused(stub: Stub, key: str) -> None:
    _, op = resolve("tools_rest", "styles")
    for bad in ("a\r\nX-Evil: 1", "a\nb", "a\rb"):
        with pytest.raises(InvalidParams, match="request_id: a header value must not contain line breaks"):
            op.validate_params({"key": key, "n": 1, "tags": [], "request_id": bad})
    assert stub.hits_for(key) == []


def test_nested_schemas_are_validated_exactly() -> None:
    _, op = resolve("tools_rest", "styles")
    with pytest.raises(InvalidParams, match="n: fails minimum"):
        op.validate_params({"key": "k", "n": 0, "tags": []})
    with pytest.raises(InvalidParams, match=r"filter\.a: required"):
        op.validate_params({"key": "k", "n": 1, "tags": [], "filter": {}})
    _, create = resolve("tools_stub", "create")
    with pytest.raises(InvalidParams, match=r"body.tags.0: must be one of \"red\", \"green\""):
        create.validate_params({"key": "k", "body": {"title": "t", "tags": ["blue"]}})


def test_a_form_body_is_urlencoded(stub: Stub, key: str) -> None:
    send("tools_rest", "form", {"key": key, "name": "a b&c", "count": 2, "tags": ["x", "y"]})
    (hit,) = stub.hits_for(key)
    assert hit.headers["content-type"] == "application/x-www-form-urlencoded"
    assert hit.body == b"name=a+b%26c&count=2&tags=x&tags=y"


def test_a_multipart_body_sends_files_and_fields(stub: Stub, key: str) -> None:
    content = b"\x00\x01binary"
    params = {
        "key": key,
        "body": {"note": "hi", "file": base64.b64encode(content).decode(), "meta": {"a": 1}},
    }
    send("tools_rest", "upload", params)
    (hit,) = stub.hits_for(key)
    ctype = hit.headers["content-type"]
    assert ctype.startswith("multipart/form-data; boundary=")
    boundary = ctype.split("boundary=")[1].encode()
    parts = [p for p in hit.body.split(b"--" + boundary) if p.strip(b"-\r\n")]
    assert len(parts) == 3
    file_part = next(p for p in parts if b'name="file"' in p)
    assert b'filename="file"' in file_part and file_part.endswith(content + b"\r\n")
    meta = next(p for p in parts if b'name="meta"' in p)
    assert b"application/json" in meta and meta.strip().endswith(b'{"a": 1}')


def test_a_whole_schema_body_is_sent_as_given_or_not_at_all(stub: Stub, key: str) -> None:
    send("tools_rest", "whole", {"key": key, "body": [1, 2]})
    send("tools_rest", "whole", {"key": key})
    with_body, without = stub.hits_for(key)
    assert json.loads(with_body.body) == [1, 2]
    assert without.body == b""


SHORT = """
services:
  svc:
    base_url: https://api.example.com
    operations:
      op: {method: GET, path: "/x/{id}", OP}
"""


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("path_params: {other: int}", "path_params: 'other' is not a placeholder of path"),
        ("query: {q: {schema: {type: string}, style: matrix}}", "style: one of form"),
        ("headers: {h: {schema: {type: string}, name: 'Bad Header'}}", "headers: a header name is"),
        ("query: {q: {schema: {type: string}, colour: red}}", "beside schema: a parameter has only"),
        ("body: {a: str}, body_schema: {type: object}", "give body (named properties) or body_schema"),
        ("query: {id: str}", "query: parameter 'id' is declared twice"),
        ("query: {q: {type: strin}}", "not a valid JSON Schema"),
    ],
)
def test_broken_parameters_name_the_problem(tmp_path: Path, op: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SHORT.replace("OP", op))
    with pytest.raises(ConfigError, match=r"services\.svc\.operations\.op") as e:
        load_services(path, Settings())
    assert message in str(e.value)
