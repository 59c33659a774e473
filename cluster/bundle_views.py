"""Central's firmware bundle for its members: GET /cluster/bundles/<version>/<sha256>/.

Not a page: no session, no login. A member proves itself with a signed request
(cluster.bundles, the same keys as every cluster message); the view parses the request, asks
the service which file may go out, and streams it. ``Range: bytes=N-`` resumes a cut transfer
(206), guarded by ``If-Range`` against the bundle's ETag, its SHA-256, so a resume never splices
two different files.
"""

from __future__ import annotations

import os
import re

from django.contrib.auth.decorators import login_not_required
from django.http import FileResponse, HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from cluster import bundles

# One open range is what a resuming download asks for; anything else gets the whole file
# (a server may ignore Range).
OPEN_RANGE = re.compile(r"^bytes=(\d{1,19})-$")


def _refusal(exc: bundles.FetchRefused) -> HttpResponse:
    response = HttpResponse(f"{exc}\n", status=exc.status, content_type="text/plain")
    if exc.status == 401:
        response["WWW-Authenticate"] = f'{bundles.HEADER} realm="LMI cluster"'
    return response


def _start(request: HttpRequest, etag: str, size: int) -> int | None:
    """Where the answer starts: 0 (the whole file), a byte offset, or None (416)."""
    match = OPEN_RANGE.match(request.headers.get("Range", "").strip())
    if match is None:
        return 0
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range != etag:
        return 0  # the member's part is of another file: it starts over
    start = int(match.group(1))
    return start if start < size else None


@login_not_required
@never_cache
@require_safe
def bundle(request: HttpRequest, version: str, sha256: str) -> HttpResponse:
    """The verified bundle ``version``/``sha256`` to a member of this cluster (or 401/403/404)."""
    try:
        served = bundles.bundle_for_member(
            header=request.META.get(bundles.META_HEADER, ""),
            version=version,
            sha256=sha256,
            origin=request.META.get("REMOTE_ADDR", ""),
        )
    except bundles.FetchRefused as exc:
        return _refusal(exc)
    etag = f'"{served.sha256}"'
    try:
        handle = served.path.open("rb")
    except FileNotFoundError:
        return HttpResponse("The bundle just left the spool.\n", status=404)
    size = os.fstat(handle.fileno()).st_size  # what goes out; the member checks it
    start = _start(request, etag, size)
    if start is None:
        handle.close()
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    handle.seek(start)
    if request.method == "GET":
        bundles.served_event(served, start)
    response = FileResponse(handle, content_type="application/octet-stream")
    response["ETag"] = etag
    response["Accept-Ranges"] = "bytes"
    if start:
        response.status_code = 206
        response["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    return response
