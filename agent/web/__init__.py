"""aiohttp: health, metrics, integration health, the cloud's pull feed (later: tablet pages, local REST API)."""
