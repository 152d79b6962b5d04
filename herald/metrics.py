"""Prometheus metrics every herald process exports (queue depth, latency, error rate)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("herald.metrics")

MESSAGES = Counter(
    "herald_messages", "Messages a worker settled, by outcome "
    "(delivered, retried, deferred, dead_lettered)", ["channel", "outcome"])
DELIVERIES = Counter(
    "herald_deliveries", "Per-recipient deliveries, by result (sent, failed, duplicate)",
    ["channel", "provider", "result"])
SEND_SECONDS = Histogram(
    "herald_provider_send_seconds", "Time a provider took to accept one notification",
    ["channel", "provider"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
INFLIGHT = Gauge("herald_inflight_messages", "Messages a worker is handling now", ["channel"])
PAUSED = Gauge("herald_channel_paused", "1 while every provider of the channel is down",
               ["channel"])
QUEUE_DEPTH = Gauge("herald_queue_messages", "Messages ready in a queue (sampled)", ["queue"])
EVENTS = Counter("herald_events", "Events written to the outbox by the API", ["type"])
RELAYED = Counter("herald_relay_published", "Outbox events confirmed by the broker")
OUTBOX_PENDING = Gauge("herald_outbox_pending", "Outbox events not yet published (sampled)")


def serve(port: int, host: str = "127.0.0.1") -> bool:
    """Expose ``/metrics`` on ``host:port`` from a background thread (0 = off).

    Returns False, with a warning, when the port is taken: metrics are not
    worth a crash-looping worker.
    """
    if not port:
        return False
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics not served: %s:%d: %s", host, port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True
