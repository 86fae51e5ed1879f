"""A GraphQL service's operations: a document and the schema of its variables, checked at load.

The document must parse, hold one query or mutation (or name it: ``operation_name``), and
declare exactly the variables listed, a variable being required here exactly when the document
says ``Type!`` without a default (https://spec.graphql.org/October2021/#sec-Variables).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from graphql import (
    DocumentNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLSyntaxError,
    ListTypeNode,
    NamedTypeNode,
    Node,
    NonNullTypeNode,
    OperationDefinitionNode,
    OperationType,
    TypeNode,
    VariableDefinitionNode,
    VariableNode,
    Visitor,
    parse,
    print_ast,
    value_from_ast_untyped,
    visit,
)
from graphql.language.visitor import SKIP, VisitorAction
from pydantic import Field, field_validator

from integrations.services import params as P
from integrations.services.base import Operation

#: A variable in the services file: a short type (``"int | None"``) or a JSON Schema.
ParamSpec = str | dict[str, Any]

#: JSON Schema types a built-in scalar's value may have (https://spec.graphql.org/October2021/#sec-Scalars).
_SCALAR_TYPES: dict[str, set[str]] = {
    "Int": {"integer"},
    "Float": {"number", "integer"},
    "String": {"string"},
    "ID": {"string", "integer"},
    "Boolean": {"boolean"},
}


@functools.lru_cache(maxsize=1024)
def _parse(document: str) -> DocumentNode:
    return parse(document)


class GraphqlOperation(Operation):
    """``{document, variables, operation_name, description}``: one GraphQL operation."""

    document: str = Field(min_length=1)
    #: The JSON Schema of each of the document's variables, by name (without the ``$``).
    variables: dict[str, ParamSpec] = Field(default_factory=dict)
    #: Which of the document's operations to run, when it holds several.
    operation_name: str | None = None

    @field_validator("document")
    @classmethod
    def _parses(cls, v: str) -> str:
        try:
            _parse(v)
        except GraphQLSyntaxError as e:
            where = f" at line {e.locations[0].line}, column {e.locations[0].column}" if e.locations else ""
            raise ValueError(f"does not parse ({e.message.rstrip('.')}{where})") from None
        return v

    @property
    def definition(self) -> OperationDefinitionNode:
        """The operation of the document this one runs."""
        ops = [d for d in _parse(self.document).definitions if isinstance(d, OperationDefinitionNode)]
        if self.operation_name is not None:
            named = [op for op in ops if op.name is not None and op.name.value == self.operation_name]
            if not named:
                raise ValueError("operation_name: the document has no operation of that name")
            return named[0]
        if len(ops) != 1:
            raise ValueError(
                "document: holds no operation"
                if not ops
                else "operation_name: the document holds several operations; name the one to run"
            )
        return ops[0]

    @property
    def operation_type(self) -> str:
        return self.definition.operation.value

    def build_parameters(self) -> dict[str, Any]:
        op = self.definition
        if op.operation == OperationType.SUBSCRIPTION:
            raise ValueError("document: a subscription does not run over one HTTP request")
        declared = {d.variable.name.value: d for d in op.variable_definitions or ()}
        missing = [name for name in declared if name not in self.variables]
        if missing:
            names = ", ".join(f"${n}" for n in missing)
            raise ValueError(f"variables: the document declares {names}, not listed here")
        for name in self.variables:
            if name not in declared:
                raise ValueError(f"variables.{name}: not a variable the document declares")
        used = _variables_used(_parse(self.document), op)
        if used - declared.keys():
            names = ", ".join(f"${n}" for n in sorted(used - declared.keys()))
            raise ValueError(f"document: uses {names} without declaring it in the operation")
        if declared.keys() - used:
            names = ", ".join(f"${n}" for n in sorted(declared.keys() - used))
            raise ValueError(f"document: declares {names} and never uses it")

        props: dict[str, dict[str, Any]] = {}
        required: list[str] = []
        for name, node in declared.items():
            schema, needed = P.field(self.variables[name])
            _check_variable(name, node, schema, needed)
            if node.default_value is not None and "default" not in schema:
                schema = {**schema, "default": value_from_ast_untyped(node.default_value)}
            props[name] = schema
            if needed:
                required.append(name)
        about = (
            self.description or f"Runs this GraphQL {op.operation.value}: {' '.join(self.document.split())}"
        )
        return P.object_schema(props, required, about)


def _check_variable(name: str, node: VariableDefinitionNode, schema: Mapping[str, Any], needed: bool) -> None:
    """Raise ``ValueError`` when a variable's schema here disagrees with its type in the document."""
    type_text = print_ast(node.type)
    must = isinstance(node.type, NonNullTypeNode) and node.default_value is None
    if must and not needed:
        raise ValueError(f"variables.{name}: the document requires it ({type_text}); it is optional here")
    if needed and not must:
        raise ValueError(
            f"variables.{name}: the document lets it be left out ({type_text}"
            f"{' with a default' if node.default_value is not None else ''}); it is required here"
        )
    allowed = _json_types(node.type)
    given = schema.get("type")
    kinds = {given} if isinstance(given, str) else set(given) if isinstance(given, list) else set()
    if not isinstance(node.type, NonNullTypeNode):
        kinds.discard("null")
    if allowed is not None and kinds - allowed:
        raise ValueError(
            f"variables.{name}: the document declares {type_text}, which is not {' or '.join(sorted(kinds))}"
        )


def _json_types(node: TypeNode) -> set[str] | None:
    """The JSON Schema types a value of GraphQL type ``node`` may have (``None``: any, for enums,
    input objects and custom scalars, which only the server's schema knows)."""
    if isinstance(node, NonNullTypeNode):
        return _json_types(node.type)
    if isinstance(node, ListTypeNode):
        inner = _json_types(node.type)
        # A single value is coerced to a list of one (https://spec.graphql.org/October2021/#sec-List.Input-Coercion).
        return None if inner is None else {"array", *inner}
    return _SCALAR_TYPES.get(node.name.value) if isinstance(node, NamedTypeNode) else None


def _variables_used(doc: DocumentNode, op: OperationDefinitionNode) -> set[str]:
    """The variables ``op`` uses, in its selections and in the fragments it spreads, however deep."""
    fragments = {d.name.value: d for d in doc.definitions if isinstance(d, FragmentDefinitionNode)}
    collector = _Collector()
    seen: set[str] = set()
    todo: list[Node] = [op]
    while todo:
        visit(todo.pop(), collector)
        for spread in collector.spreads - seen:
            seen.add(spread)
            if spread in fragments:
                todo.append(fragments[spread])
    return collector.variables


class _Collector(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.variables: set[str] = set()
        self.spreads: set[str] = set()

    def enter_variable_definition(self, node: VariableDefinitionNode, *_: Any) -> VisitorAction:
        return SKIP  # a definition, not a use

    def enter_variable(self, node: VariableNode, *_: Any) -> None:
        self.variables.add(node.name.value)

    def enter_fragment_spread(self, node: FragmentSpreadNode, *_: Any) -> None:
        self.spreads.add(node.name.value)


# ---- the answer ------------------------------------------------------------------------------
