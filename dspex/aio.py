"""The asyncio client's public module: ``dspex.aio.connect()`` (see :mod:`dspex.client.aio`)."""

from dspex.client.aio import AsyncClient, AsyncSession, AsyncStream, connect
from dspex.client.rehydrator import Rehydrator

__all__ = ["AsyncClient", "AsyncSession", "AsyncStream", "Rehydrator", "connect"]
