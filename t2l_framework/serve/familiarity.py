"""Familiarity in the server: each generated adapter's familiarity and nearest training tasks,
computed once on the model worker and kept with the adapter (``runtime/inspection.py``)."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from t2l_framework.serve.schemas import MAX_DESCRIPTION_CHARS, Text, _description

MAX_INSPECT = 8  # descriptions per /v1/inspect request: each one is an adapter forward + T comparisons


class InspectRequest(BaseModel):
    """POST /v1/inspect."""

    descriptions: list[Text] = Field(min_length=1, max_length=MAX_INSPECT)
    top: int = Field(5, ge=1, le=20)

    @field_validator("descriptions")
    @classmethod
    def _check(cls, values: list[str]) -> list[str]:
        out = []
        for value in values:
            if len(value) > MAX_DESCRIPTION_CHARS:
                raise ValueError(f"each description is at most {MAX_DESCRIPTION_CHARS} characters")
            out.append(_description(value))
        return out


async def adapter_familiarity(service, inspector, item) -> dict | None:
    """The adapter's familiarity summary (None without an inspector), computed on first use."""
    if inspector is None:
        return None
    if getattr(item, "familiarity", None) is None:
        item.familiarity = (await service.batcher.run_model(inspector.familiarity, [item.description]))[0]
    return item.familiarity
