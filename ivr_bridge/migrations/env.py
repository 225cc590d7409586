"""Alembic environment of the call records.

`CallStore.open` runs the upgrade itself, passing its connection in
`config.attributes["connection"]`. For a developer's `alembic` command (e.g.
`alembic -x url=sqlite+aiosqlite:///ivr-bridge.db revision -m "..."`), the URL comes from
`-x url=...` or `sqlalchemy.url`.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from ivr_bridge.records import VERSION_TABLE, metadata

config = context.config
target_metadata = metadata


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,  # not `alembic_version`: the database may be shared
        render_as_batch=True,  # ALTERs on SQLite go through table copies
        **kwargs,
    )


def _url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _run(connection)
else:
    asyncio.run(_run_async())
