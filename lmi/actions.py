"""What every page that changes something does around its one service call.

A change is for administrators (:func:`administrators_only`, besides the read-only role's
middleware, so a view never depends on being reached only through it), calls one service, and
tells the outcome as a flash message: the service's refusal in its own words, or what was done
(:func:`act`). Written once here so that every page says it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from django.contrib import messages
from django.http import HttpRequest, HttpResponse

from accounts.roles import is_administrator
from lmi.errors import read_only_refusal

T = TypeVar("T")


def administrators_only(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """403 with the read-only refusal for anyone but an administrator."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not is_administrator(request.user):
            return read_only_refusal(request)
        return view(request, *args, **kwargs)

    return wrapped


def act(
    request: HttpRequest,
    action: Callable[[], T],
    refusals: type[Exception] | tuple[type[Exception], ...],
    done: str | Callable[[T], str],
) -> T | None:
    """Run ``action``; flash ``done`` (or ``done(result)``) and return the result, or flash the
    refusal (one of ``refusals``, whose message is written for the administrator) and return
    None."""
    try:
        result = action()
    except refusals as exc:
        messages.error(request, str(exc))
        return None
    messages.success(request, done if isinstance(done, str) else done(result))
    return result
