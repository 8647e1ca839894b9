"""Club edge agent: embedded MQTT broker, offline-first check-ins, durable sync."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("club-agent")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+src"
