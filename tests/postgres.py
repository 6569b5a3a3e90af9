"""A private PostgreSQL server for tests (the benchmark's, ``bench.postgres``, which it also uses)."""

from bench.postgres import PostgresServer, binaries

__all__ = ["PostgresServer", "binaries"]
