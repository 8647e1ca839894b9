"""Pure rules and data: no IO, no asyncio, no clock reads (time is passed in)."""
