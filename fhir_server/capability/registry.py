"""The R4 structure definitions, compiled into frozen lookup tables at start-up.

The data comes from ``data/structures.json`` (written by
``tools/compile_definitions.py`` from the official definitions). Nothing here is
written per resource type: every type is described by the same tables.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

FHIR_VERSION = "4.0.1"
UNBOUNDED = -1


@dataclass(frozen=True, slots=True)
class Primitive:
    name: str
    json_kind: str  # "boolean" | "integer" | "decimal" | "string"
    pattern: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class Element:
    """One JSON property of a node, for one concrete type (a choice element yields one per type)."""

    name: str  # the element's name in the definitions, without [x]
    key: str  # the JSON property name (valueQuantity for value[x] of type Quantity)
    type_code: str
    min: int
    max: int  # UNBOUNDED for "*"
    primitive: Primitive | None
    target: tuple[str, str] | None  # (type, node path) to descend into for complex values
    summary: bool
    modifier: bool
    choice: bool
    targets: tuple[str, ...] = ()

    @property
    def is_array(self) -> bool:
        return self.max != 1

    @property
    def is_resource(self) -> bool:
        return self.type_code == "Resource"


@dataclass(frozen=True, slots=True)
class Node:
    """A JSON object's shape: the resource root, a data type, or an inline backbone element."""

    type_name: str
    path: str
    keys: dict[str, Element]  # JSON key (and "_key" for primitive extensions) -> element
    required: tuple[tuple[str, tuple[str, ...]], ...]  # (element name, JSON keys that satisfy it)
    choices: dict[str, tuple[str, ...]]  # element name -> its JSON keys


@dataclass(frozen=True, slots=True)
class TypeDefinition:
    name: str
    kind: str  # "resource" | "complex-type"
    abstract: bool
    base: str | None
    root: Node
    nodes: dict[str, Node] = field(repr=False)


class Registry:
    """Resource types, data types and primitives of FHIR R4, read-only after construction."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.fhir_version: str = data["fhirVersion"]
        self.primitives: dict[str, Primitive] = {
            name: Primitive(name, p["json"], re.compile(p["regex"]) if p.get("regex") else None)
            for name, p in data["primitives"].items()
        }
        raw_types: dict[str, Any] = data["types"]
        self.types: dict[str, TypeDefinition] = {}
        for name, raw in raw_types.items():
            nodes = {path: self._node(name, path, children) for path, children in raw["nodes"].items()}
            self.types[name] = TypeDefinition(
                name=name,
                kind=raw["kind"],
                abstract=bool(raw.get("abstract")),
                base=raw.get("base"),
                root=nodes[name],
                nodes=nodes,
            )
        self.resource_types: tuple[str, ...] = tuple(
            sorted(n for n, t in self.types.items() if t.kind == "resource" and not t.abstract)
        )
        self._resource_type_set = frozenset(self.resource_types)

    def is_resource_type(self, name: str) -> bool:
        return name in self._resource_type_set

    def node(self, type_name: str, path: str) -> Node:
        return self.types[type_name].nodes[path]

    def _node(self, type_name: str, path: str, children: dict[str, Any]) -> Node:
        keys: dict[str, Element] = {}
        required: list[tuple[str, tuple[str, ...]]] = []
        choices: dict[str, tuple[str, ...]] = {}
        for name, spec in children.items():
            if "ref" in spec:
                # contentReference: same shape as another backbone node of this type.
                elements = [self._element(name, name, "BackboneElement", spec, (type_name, spec["ref"]))]
            else:
                elements = []
                for code in spec["types"]:
                    key = name + code[0].upper() + code[1:] if spec.get("choice") else name
                    target = None
                    if "node" in spec:
                        target = (type_name, spec["node"])
                    elif code not in self.primitives and code != "Resource":
                        target = (code, code)
                    elements.append(self._element(name, key, code, spec, target))
            satisfying: list[str] = []
            for el in elements:
                keys[el.key] = el
                satisfying.append(el.key)
                if el.primitive is not None:
                    keys["_" + el.key] = el
                    satisfying.append("_" + el.key)
            if spec.get("choice"):
                choices[name] = tuple(el.key for el in elements)
            if spec["min"] > 0:
                required.append((name, tuple(satisfying)))
        return Node(type_name, path, keys, tuple(required), choices)

    def _element(
        self, name: str, key: str, code: str, spec: dict[str, Any], target: tuple[str, str] | None
    ) -> Element:
        max_ = spec["max"]
        return Element(
            name=name,
            key=key,
            type_code=code,
            min=spec["min"],
            max=UNBOUNDED if max_ == "*" else int(max_),
            primitive=self.primitives.get(code),
            target=target,
            summary=bool(spec.get("summary")),
            modifier=bool(spec.get("modifier")),
            choice=bool(spec.get("choice")),
            targets=tuple(spec.get("targets", ())),
        )


@cache
def load_registry() -> Registry:
    """The process-wide registry (built once; it is immutable)."""
    with resources.files("fhir_server.capability").joinpath("data/structures.json").open("rb") as fh:
        return Registry(json.load(fh))
