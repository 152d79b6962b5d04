"""Request and response models of the API (apart from table rows and the wire envelope)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator


def _normalise_email(value: str) -> str:
    return value.strip().lower()


class SignupIn(BaseModel):
    """``POST /signup`` body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [
            {"email": "ada@example.com", "password": "correct horse battery", "name": "Ada"}
        ]
    })

    email: EmailStr
    password: str = Field(min_length=8, max_length=1024)
    name: str = Field(min_length=1, max_length=200)

    _email = field_validator("email")(_normalise_email)

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("name must not be blank")
        return value


class LoginIn(BaseModel):
    """``POST /login`` body."""

    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    password: str = Field(min_length=1, max_length=1024)

    _email = field_validator("email")(_normalise_email)


class UserPublic(BaseModel):
    """A user as the API shows it (no password hash)."""

    id: str
    email: str
    name: str


class EventAccepted(BaseModel):
    """What a route that raised an event answers."""

    user: UserPublic
    event_id: str
