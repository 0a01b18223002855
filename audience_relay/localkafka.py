"""Compatibility path of the local broker (``devtools.localkafka``).

The shared side-by-side benchmark (``../shared/peers/broker.py``) imports ``audience_relay.localkafka``
from a checkout with only the standard library; the module itself lives with the dev tooling.
"""

from devtools.localkafka import LocalKafka, LocalKafkaError, fetch_jars, free_port, port_open

__all__ = ["LocalKafka", "LocalKafkaError", "fetch_jars", "free_port", "port_open"]
