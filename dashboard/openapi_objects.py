"""The OpenAPI 3.1 objects dashboard/openapi.py writes the CA API in: a documented response (`Answer`) and an
operation (`Route`), each rendered to the document's JSON, with request bodies and responses as `$ref`s to the
models' own schemas (components/schemas). What the API is lives in dashboard/openapi.py; how it is spelled, here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

REF = "#/components/schemas/{model}"
JSON = "application/json"
PEM = "application/x-pem-file"


@dataclass(frozen=True)
class Answer:
    """One documented response: its description, and a model (JSON) or other media types with their schemas."""

    description: str
    model: type[BaseModel] | None = None
    example: Any = None
    media: dict[str, dict[str, Any]] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)

    def render(self) -> dict[str, Any]:
        content = dict(self.media)
        if self.model is not None:
            content[JSON] = {"schema": {"$ref": REF.format(model=self.model.__name__)}}
            if self.example is not None:
                content[JSON]["example"] = self.example
        answer: dict[str, Any] = {"description": self.description}
        if content:
            answer["content"] = content
        if self.headers:
            answer["headers"] = self.headers
        return answer


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    answers: dict[str, Answer]
    security: list[dict[str, list[str]]]
    description: str = ""
    body: type[BaseModel] | None = None
    examples: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    query: type[BaseModel] | None = None

    def render(self, queries: dict[str, Any]) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": self.summary,
            "security": self.security,
            "operationId": f"{self.method}_{self.path.strip('/').replace('/', '_')}",
        }
        if self.description:
            operation["description"] = self.description
        if self.query is not None:
            properties = queries[self.query.__name__]["properties"]
            operation["parameters"] = [
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "description": schema.get("description", ""),
                    "schema": {
                        key: value for key, value in schema.items() if key not in ("description", "title", "default")
                    },
                }
                for name, schema in properties.items()
            ]
        if self.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {"$ref": REF.format(model=self.body.__name__)},
                        "examples": {
                            key: {"summary": summary, "value": value} for key, (summary, value) in self.examples.items()
                        },
                    }
                },
            }
        operation["responses"] = {status: answer.render() for status, answer in self.answers.items()}
        return operation
