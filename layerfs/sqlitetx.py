"""One write transaction on an autocommit SQLite connection (``isolation_level=None``).

``BEGIN IMMEDIATE`` takes the database's write lock at the start, so two processes
never both read and then both write; the block's exception rolls it back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in one transaction: committed at its end, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
