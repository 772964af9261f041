"""One error hierarchy for the whole service; each error carries its HTTP status."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    status_code: int = 500


class ModelNotFound(ServiceError):
    """The named model (or version) is not in the repository."""

    status_code = 404


class InvalidInput(ServiceError):
    """The request's data or options are malformed or out of range."""

    status_code = 400


class LimitExceeded(InvalidInput):
    """The request asks for more than the model's limits allow."""

    status_code = 422


class NonFiniteOutput(ServiceError):
    """The request was valid, but the model cannot compute a finite answer for it (NaN or inf)."""

    status_code = 422


class Overloaded(ServiceError):
    """The model's queue is full; retry later."""

    status_code = 503


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its work could finish."""

    status_code = 504


class ModelLoadError(ServiceError):
    """A model folder could not be turned into a servable model (its files are wrong)."""

    status_code = 400


class Forbidden(ServiceError):
    """The operation is switched off for this caller (control without a token from afar)."""

    status_code = 403


class Unauthorized(ServiceError):
    """A bearer token is required and was missing or wrong."""

    status_code = 401


class ClientGone(ServiceError):
    """The client disconnected before its answer was ready."""

    status_code = 499
