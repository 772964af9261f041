"""Operational endpoints: Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from mcdrop.serving.metrics import Metrics

router = APIRouter(tags=["admin"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the service's counters, histograms and gauges."""
    collectors: Metrics = request.app.state.metrics
    body, content_type = collectors.render()
    return Response(body, media_type=content_type)
