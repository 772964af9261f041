"""A small HTTP client of a running mcdrop server (used by `mcdrop predict --url`)."""

from __future__ import annotations

from typing import Any

import httpx

from mcdrop.errors import InvalidInput, ModelNotFound, ServiceError

TIMEOUT_S = 60.0


class RemoteError(ServiceError):
    """The server answered with an error body."""


def _headers(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _check(response: httpx.Response) -> Any:
    if response.status_code < 400:
        return response.json()
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    error = ModelNotFound if response.status_code == 404 else RemoteError
    raise error(f"server answered {response.status_code}: {message}")


def model_info(url: str, model: str, token: str | None = None) -> dict[str, Any]:
    """The server's description of one model (shape, limits, state)."""
    with httpx.Client(base_url=url, timeout=TIMEOUT_S, headers=_headers(token)) as client:
        for info in _check(client.get("/v1/models")):
            if info["name"] == model:
                if info["state"] != "READY":
                    raise InvalidInput(f"model '{model}' is {info['state']}: {info.get('error')}")
                return dict(info)
    raise ModelNotFound(f"model '{model}' is not served at {url}")


def predict(url: str, model: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """POST /v1/models/{model}/predict and return the server's JSON answer."""
    with httpx.Client(base_url=url, timeout=TIMEOUT_S, headers=_headers(token)) as client:
        answer: dict[str, Any] = _check(client.post(f"/v1/models/{model}/predict", json=body))
        return answer
