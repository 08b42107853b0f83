"""The typed answers (``output_type``) the tests ask for."""

from __future__ import annotations

from pydantic import BaseModel


class Entity(BaseModel):
    name: str
    mentions: int


class Entities(BaseModel):
    entities: list[Entity]
    language: str
