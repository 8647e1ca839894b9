"""aiohttp: health, metrics (and later the tablet pages, local REST API and pull feed)."""
