"""Alembic migrations of the call records (run by `CallStore.open`)."""
