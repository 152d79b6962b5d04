"""Export the topology as a RabbitMQ definitions file (``rabbitmqctl import_definitions``)."""

from __future__ import annotations

from typing import Any

from topology.spec import Topology


def definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """A definitions document the management UI and ``rabbitmqctl import_definitions`` accept.

    Only exchanges, queues and bindings: users, vhosts and permissions stay
    with the operator.
    """
    return {
        "rabbit_version": "3.10.0",
        "exchanges": [
            {"name": ex.name, "vhost": vhost, "type": ex.type, "durable": True,
             "auto_delete": False, "internal": False, "arguments": {}}
            for ex in topology.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False,
             "arguments": dict(q.arguments)}
            for q in topology.queues
        ],
        "bindings": [
            {"source": b.exchange, "vhost": vhost, "destination": b.queue,
             "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}}
            for b in topology.bindings
        ],
    }
