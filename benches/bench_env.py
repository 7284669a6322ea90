"""What the Python bench drivers (relay_compare.py, hub_soak.py) share: the
settings that lift the hub's per-client limits for load runs, and a free
loopback port."""
import socket

# Load runs come from one machine at rates no single real client makes.
LIFTED = {
    "ROOMHUB_LIMITS__PUBLISH_PER_SEC": "1000000",
    "ROOMHUB_LIMITS__PUBLISH_BURST": "1000000",
    "ROOMHUB_LIMITS__MAX_CONNECTIONS_PER_IP": "100000",
    "ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC": "100000",
    "RUST_LOG": "warn",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
