"""The asyncio client's public module: ``dspex.aio.connect()`` (see :mod:`dspex.client.aio`)."""

from dspex.client.aio import AsyncClient, AsyncSession, AsyncStream, Rehydrator, connect

__all__ = ["AsyncClient", "AsyncSession", "AsyncStream", "Rehydrator", "connect"]
