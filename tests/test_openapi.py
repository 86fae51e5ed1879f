"""`integrations import-openapi`: the published OpenAPI examples (tests/specs/oai), a Swagger 2.0
document, and a large generated one, imported, loaded as services files, and called against a
loopback server generated from the same document that checks every request with openapi-core."""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_server import SpecServer
from procs import cli, env_with
from stub import Stub

from integrations import http
from integrations.config import Settings
from integrations.services import Attempt, load_services
from integrations.services.rest import RestService
from integrations.tools.openapi import import_openapi
from integrations.tools.openapi_schema import ImportFailed
from integrations.tools.openapi_write import merge, render

#: The OpenAPI Initiative's published examples (tests/specs/oai/NOTICE).
SPECS = Path(__file__).resolve().parent / "specs" / "oai"
HERE = Path(__file__).resolve().parent


def sample(schema: Any, defs: dict[str, Any]) -> Any:
    """A value that fits ``schema``: its required parts only, the first of each choice."""
    if not isinstance(schema, dict):
        return "x"
    if "$ref" in schema:
        return sample(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "enum" in schema:
        return next(v for v in schema["enum"] if v is not None)
    if "allOf" in schema:
        out: dict[str, Any] = {}
        for part in schema["allOf"]:
            out.update(sample(part, defs))
        return out
    for choice in ("anyOf", "oneOf"):
        if choice in schema:
            return sample(schema[choice][0], defs)
    kind = schema.get("type")
    kind = next(t for t in kind if t != "null") if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: sample(props.get(k, {}), defs) for k in schema.get("required") or []}
    if kind == "array":
        return [sample(schema.get("items", {}), defs)]
    if kind == "integer":
        return max(1, int(schema.get("minimum", 1)))
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if schema.get("contentEncoding") == "base64":
        return base64.b64encode(b"content").decode()
    return "x"


def imported_file(tmp_path: Path, spec: Path, base_url: str, service: str) -> Path:
    """Import with the command, then check the file with ``integrations services``.

    Each test names its own service: HTTP sessions are kept per service name and process."""
    out = tmp_path / "services.yaml"
    result = cli(
        "import-openapi", str(spec), "--service", service, "--base-url", base_url,
        "--allow-private-network", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{service}: " in result.stderr and " operations imported" in result.stderr
    checked = cli("services", env=env_with(SERVICES_FILE=out))
    assert checked.returncode == 0 and f"{service} (rest," in checked.stdout, checked.stderr
    return out


def call_every_operation(path: Path, service: str, server: SpecServer, only: slice = slice(None)) -> int:
    """Call each imported operation with params made from its schema; the server checks each."""
    svc = load_services(path, Settings())[service]
    assert isinstance(svc, RestService)
    called = 0
    for name, op in list(svc.operations.items())[only]:
        Draft202012Validator.check_schema(op.parameters)
        params = op.validate_params(sample(op.parameters, op.parameters.get("$defs", {})))
        resp = http.send(svc, svc.request(op, params, Attempt(f"job-{name}")), 65536)
        assert resp.status_code == 200, (name, resp.data())
        called += 1
    assert not [s for s in server.seen if s.errors]
    return called


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[SpecServer] = []

    def start(document: dict[str, Any], prefix: str = "") -> SpecServer:
        servers.append(SpecServer(document, prefix).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.mark.parametrize(
    ("name", "operations", "prefix"),
    [
        ("v3.0-petstore-expanded.yaml", 4, "/v2"),
        ("v3.0-api-with-examples.yaml", 2, ""),
        ("v3.0-link-example.yaml", 6, ""),
    ],
)
def test_a_published_example_imports_loads_and_every_call_is_valid(
    tmp_path: Path, serve: Any, name: str, operations: int, prefix: str
) -> None:
    document = yaml.safe_load((SPECS / name).read_text())
    server = serve(document, prefix)
    service = "pub_" + name.split("-", 1)[1].split(".")[0].replace("-", "_")
    path = imported_file(tmp_path, SPECS / name, server.url, service)
    assert call_every_operation(path, service, server) == operations == len(server.seen)


def test_petstore_query_arrays_and_json_body_are_sent_as_the_document_says(
    tmp_path: Path, serve: Any
) -> None:
    document = yaml.safe_load((SPECS / "v3.0-petstore-expanded.yaml").read_text())
    server = serve(document, "/v2")
    path = imported_file(tmp_path, SPECS / "v3.0-petstore-expanded.yaml", server.url, "petstore")
    svc = load_services(path, Settings())["petstore"]
    assert isinstance(svc, RestService)
    find, add = svc.operations["find_pets"], svc.operations["add_pet"]
    assert find.parameters["properties"]["tags"] == {
        "type": "array", "items": {"type": "string"}, "description": "tags to filter by",
    }  # fmt: skip
    for op, params in (
        (find, {"tags": ["dog", "cat"], "limit": "3"}),
        (add, {"body": {"name": "Rex", "tag": "dog"}}),
    ):
        assert (
            http.send(svc, svc.request(op, op.validate_params(params), Attempt("j")), 65536).status_code
            == 200
        )
    listing, created = server.seen
    assert listing.query == {"tags": ["dog", "cat"], "limit": ["3"]} and not listing.errors
    assert json.loads(created.body) == {"name": "Rex", "tag": "dog"} and not created.errors
    with pytest.raises(Exception, match=r"body: name: required|body\.name: required"):
        add.validate_params({"body": {"tag": "dog"}})


def test_a_31_document_with_webhooks(tmp_path: Path, serve: Any) -> None:
    # The published 3.1 example describes a webhook only: nothing to call, and it says so.
    alone = cli(
        "import-openapi",
        str(SPECS / "v3.1-webhook-example.yaml"),
        "--service",
        "api",
        "--base-url",
        "https://x.example",
    )
    assert alone.returncode == 2
    assert (
        "no operation to import (webhook newPet (POST): a webhook: the API calls its subscribers"
        in alone.stderr
    )
    # The same document with a path beside its webhook: the path is imported, the webhook listed.
    document = yaml.safe_load((SPECS / "v3.1-webhook-example.yaml").read_text())
    document["paths"] = {
        "/pets": {
            "post": {
                "operationId": "addPet",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pet"}}},
                },
                "responses": {"200": {"description": "ok"}},
            }
        }
    }
    spec = tmp_path / "webhooks-and-paths.json"
    spec.write_text(json.dumps(document))
    server = serve(document)
    path = imported_file(tmp_path, spec, server.url, "hooks")
    assert "#   - webhook newPet (POST): a webhook: the API calls its subscribers" in path.read_text()
    assert call_every_operation(path, "hooks", server) == 1
    assert json.loads(server.seen[0].body) == {"id": 1, "name": "x"}


def test_swagger_2_document(tmp_path: Path, stub: Stub, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORE_API_KEY", "store-key")
    spec = HERE / "specs" / "swagger2-store.yaml"
    imp = import_openapi(spec, "store", base_url=f"{stub.url}/echo/{key}", allow_private_network=True)
    ops = imp.service["operations"]
    assert sorted(ops) == ["add_item", "list_items", "rename_item", "upload_photo"]
    assert imp.skipped == [
        ("GET /legacy (getLegacy)", "required query parameter 'ids': collectionFormat tsv is not supported"),
        ("PUT /legacy (putLegacy)", "its body is only application/xml"),
    ]
    assert imp.service["auth"] == {
        "type": "api_key",
        "in": "header",
        "name": "X-Store-Key",
        "key": "${STORE_API_KEY}",
    }
    assert ops["add_item"]["body_schema"]["schema"]["properties"]["price"] == {
        "type": "number",
        "exclusiveMinimum": 0,
    }
    path = tmp_path / "services.yaml"
    path.write_text(render(imp))
    svc = load_services(path, Settings())["store"]
    assert isinstance(svc, RestService)
    calls = {
        "list_items": {"tag": ["a", "b"], "status": ["new", "sold"], "X-Trace": "t1"},
        "add_item": {"body": {"name": "lamp", "price": 2.5}},
        "upload_photo": {"itemId": 4, "body": {"caption": "c", "file": base64.b64encode(b"PNG").decode()}},
        "rename_item": {"itemId": 4, "body": {"name": "new name"}},
    }
    for name, params in calls.items():
        op = svc.operations[name]
        http.send(svc, svc.request(op, op.validate_params(params), Attempt("j")), 65536)
    listing, added, photo, renamed = stub.hits_for(key)
    assert listing.query == {"tag": ["a", "b"], "status": ["new,sold"]} and listing.headers["x-trace"] == "t1"
    assert listing.headers["x-store-key"] == "store-key"
    assert json.loads(added.body) == {"name": "lamp", "price": 2.5}
    assert photo.path.endswith("/items/4/photo") and photo.headers["content-type"].startswith(
        "multipart/form-data"
    )
    assert b'filename="file"' in photo.body and b"PNG" in photo.body
    assert renamed.body == b"name=new+name"


def test_relative_refs_and_merge_into_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "schemas.yaml").write_text(
        "Thing: {type: object, properties: {size: {$ref: '#/Size'}}}\nSize: {type: integer, minimum: 1}\n"
    )
    (tmp_path / "api.yaml").write_text(
        """
openapi: 3.0.3
info: {title: T, version: '1'}
servers: [{url: 'https://{region}.example.com/v1', variables: {region: {default: eu}}}]
paths:
  /things:
    post:
      operationId: makeThing
      requestBody: {content: {application/json: {schema: {$ref: 'schemas.yaml#/Thing'}}}}
      responses: {'200': {description: ok}}
"""
    )
    imp = import_openapi(tmp_path / "api.yaml", "things")
    assert imp.service["base_url"] == "https://eu.example.com/v1"
    body = imp.service["operations"]["make_thing"]["body_schema"]
    assert body == {
        "schema": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}},
        "required": False,
    }
    existing = tmp_path / "services.yaml"
    existing.write_text(
        "# mine\nservices:\n  other:  # kept\n"
        "    base_url: https://o.example.com\n    operations: {a: {path: /a}}\n"
    )
    merge(imp, existing)
    merged = load_services(existing, Settings())
    assert (
        set(merged) == {"other", "things"}
        and "# mine" in existing.read_text()
        and "# kept" in existing.read_text()
    )
    with pytest.raises(ImportFailed, match="already has a service named things"):
        merge(imp, existing)


def large_document(resources: int) -> dict[str, Any]:
    """A description the size of a large real API, made the same way every time: per resource,
    list / create / get / replace / delete / patch a tree, with $refs, allOf, a recursive schema,
    enums and query styles; some operations the import cannot express."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {
        "Base": {
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "integer"}, "created": {"type": "string", "format": "date-time"}},
        },
        "Node": {
            "type": "object",
            "required": ["label"],
            "properties": {
                "label": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
            },
        },
    }
    ok = {"200": {"description": "ok"}}
    for i in range(resources):
        r = f"r{i:03d}"
        own = {
            "name": {"type": "string", "maxLength": 80},
            "state": {"type": "string", "enum": ["on", "off"], "nullable": True},
            "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        }
        schemas[f"Item{i}"] = {
            "allOf": [
                {"$ref": "#/components/schemas/Base"},
                {"type": "object", "required": ["name"], "properties": own},
            ]
        }
        item = {"$ref": f"#/components/schemas/Item{i}"}
        body = {"required": True, "content": {"application/json": {"schema": item}}}
        path_id = {
            "name": "itemId",
            "in": "path",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
        listing = [
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
            {"name": "tags", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}},
            {
                "name": "filter",
                "in": "query",
                "style": "deepObject",
                "explode": True,
                "schema": {"type": "object", "properties": {"state": {"type": "string"}}},
            },
            {"name": "X-Trace-Id", "in": "header", "required": True, "schema": {"type": "string"}},
        ]
        paths[f"/{r}"] = {
            "get": {"operationId": f"list{i}", "tags": [r], "parameters": listing, "responses": ok},
            "post": {"operationId": f"create{i}", "tags": [r], "requestBody": body, "responses": ok},
        }
        paths[f"/{r}/{{itemId}}"] = {
            "parameters": [path_id],
            "get": {"operationId": f"get{i}", "responses": ok},
            "put": {"operationId": f"replace{i}", "requestBody": body, "responses": ok},
            "delete": {"operationId": f"delete{i}", "responses": ok},
        }
        tree = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Node"}}},
        }
        paths[f"/{r}/{{itemId}}/tree"] = {
            "parameters": [path_id],
            "patch": {"operationId": f"tree{i}", "requestBody": tree, "responses": ok},
        }
        if i % 10 == 0:  # a body in a media type we do not send
            text = {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}
            paths[f"/{r}/note"] = {"post": {"operationId": f"note{i}", "requestBody": text, "responses": ok}}
        if i % 20 == 0:  # a required cookie
            cookie = [{"name": "session", "in": "cookie", "required": True, "schema": {"type": "string"}}]
            paths[f"/{r}/session"] = {
                "get": {"operationId": f"session{i}", "parameters": cookie, "responses": ok}
            }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Large", "version": "1.0"},
        "servers": [{"url": "https://large.example.com"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def test_a_large_description_imports_in_under_ten_seconds(
    tmp_path: Path, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LARGE_TOKEN", "large-token")
    document = large_document(100)
    spec = tmp_path / "large.json"
    spec.write_text(json.dumps(document))
    t0 = time.perf_counter()
    imp = import_openapi(spec, "large", allow_private_network=True)
    took = time.perf_counter() - t0
    operations, skipped = len(imp.service["operations"]), len(imp.skipped)
    print(
        f"\nlarge import: {operations} operations, {skipped} skipped, {took:.2f}s"
    )  # the figures for the README
    assert (operations, skipped) == (600, 15) and took < 10
    assert imp.service["auth"] == {"type": "bearer", "token": "${LARGE_TOKEN}"}
    tree = imp.service["operations"]["tree0"]
    assert tree["defs"]["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    server = serve(copy.deepcopy(document))
    path = tmp_path / "services.yaml"
    path.write_text(render(imp).replace("https://large.example.com", server.url))
    svc = load_services(path, Settings())["large"]
    assert isinstance(svc, RestService)
    nested = {"itemId": 3, "body": {"label": "a", "children": [{"label": "b", "children": [{"label": "c"}]}]}}
    with pytest.raises(Exception, match=r"body\.children\.0\.children\.0: label: required|label: required"):
        svc.operations["tree1"].validate_params(
            {"itemId": 3, "body": {"label": "a", "children": [{"children": []}]}}
        )
    svc.operations["tree1"].validate_params(nested)
    assert call_every_operation(path, "large", server, slice(0, None, 7)) == len(range(0, 600, 7))


def test_tags_and_operation_ids_choose_what_is_imported() -> None:
    spec = HERE / "specs" / "swagger2-store.yaml"
    by_tag = import_openapi(spec, "store", tags=("items",))
    assert sorted(by_tag.service["operations"]) == ["add_item", "list_items"] and by_tag.excluded == 4
    by_id = import_openapi(spec, "store", operations=("uploadPhoto", "rename_item"))
    assert sorted(by_id.service["operations"]) == ["rename_item", "upload_photo"] and by_id.excluded == 4


MINIMAL = {
    "openapi": "3.0.3",
    "info": {"title": "t", "version": "1"},
    "servers": [{"url": "https://api.example.com"}],
}


def _op(parameters: list[Any]) -> dict[str, Any]:
    return {
        "/a": {
            "get": {"operationId": "a", "parameters": parameters, "responses": {"200": {"description": "ok"}}}
        }
    }


def test_a_yaml_alias_bomb_is_refused_before_anything_walks_it(tmp_path: Path) -> None:
    lines = ["openapi: 3.0.3", "info: {title: t, version: '1'}", "servers: [{url: 'https://a.example.com'}]"]
    lines.append("x-a: &a [" + ",".join(['"lol"'] * 9) + "]")
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"x-{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")  # 9**9 values
    lines.append(
        "paths: {/a: {get: {operationId: a, description: *i, responses: {'200': {description: ok}}}}}"
    )
    path = tmp_path / "lol.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(ImportFailed, match=r"^lol.yaml expands to over 2,000,000 values \(YAML aliases\?\)$"):
        import_openapi(path, "s")
    assert time.perf_counter() - started < 30  # bounded: a walk of 2 M values, not 387 M


def test_refs_reach_no_url_and_no_file_outside_the_documents_folder(tmp_path: Path, stub: Stub) -> None:
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "creds.yaml").write_text(
        "name: q\nin: query\ndescription: db_password=TopSecret\nschema: {type: string}\n"
    )
    (tmp_path / "api").mkdir()
    cases = {
        f"{stub.url}/ssrf#/x": "a $ref names a URL or an absolute path: only files beside the document",
        str(tmp_path / "private" / "creds.yaml"): "a $ref names a URL or an absolute path",
        "../private/creds.yaml": "a $ref names a file outside the document's folder",
    }
    for ref, message in cases.items():
        path = tmp_path / "api" / "doc.json"
        path.write_text(json.dumps({**MINIMAL, "paths": _op([{"$ref": ref}])}))
        with pytest.raises(ImportFailed) as e:
            import_openapi(path, "s")
        assert str(e.value).startswith(message) and "TopSecret" not in str(e.value)
    assert not [h for h in stub.hits if h.path == "/ssrf"]  # nothing was fetched


BAD_PARAMETER = {"in": "query", "schema": {"type": "string"}}  # no name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00\x00garbage", "doc.yaml is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "doc.yaml is nested too deeply"),
        (
            json.dumps({**MINIMAL, "servers": [], "paths": _op([])}).encode(),
            "the document names no server; give --base-url",
        ),
        (
            json.dumps(
                {
                    **MINIMAL,
                    "paths": _op([{"$ref": "#/components/parameters/p"}]),
                    "components": {"parameters": {"p": BAD_PARAMETER}},
                }
            ).encode(),
            "doc.yaml is not a valid OpenAPI document (components/parameters/p: the value is not valid",
        ),
        (
            json.dumps({**MINIMAL, "paths": _op([{"$ref": "other.json"}])}).encode(),
            "doc.yaml: cannot convert the document (KeyError",
        ),
    ],
)
def test_a_broken_document_is_one_line_naming_the_problem(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "doc.yaml"
    path.write_bytes(content)
    (tmp_path / "other.json").write_text(json.dumps(BAD_PARAMETER))
    with pytest.raises(ImportFailed) as e:
        import_openapi(path, "s")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert "Error" not in str(e.value).split(":")[0]


def test_an_alias_to_a_long_text_used_many_times_is_refused(tmp_path: Path) -> None:
    lines = ["openapi: 3.0.3", "info: {title: t, version: '1'}", "servers: [{url: 'https://a.example.com'}]"]
    lines.append("x-big: &b " + "A" * 1_000_000)
    lines.append("x-uses: [" + ", ".join(["*b"] * 70) + "]")  # 70 MB of text from a 1 MB file
    lines.append("paths: {/a: {get: {operationId: a, responses: {'200': {description: ok}}}}}")
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ImportFailed, match=r"^big.yaml expands to over 64 MiB of text \(YAML aliases\?\)$"):
        import_openapi(path, "s")
