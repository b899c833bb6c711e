"""The facts database tool: a model writes a query block, this answers it from SQLite.

Query syntax (exactly what the qatool dialogs teach):

    ```sql
    FIND birth_place FOR Ada Moreau
    ```

The syntax, fence included, is this tool's: the dialog format (lmjax/dialog.py) only decides
where a call sits in a dialog and hands the tool the text of the assistant turn as written.

Connections are opened read-only, so a model (or a bug) can never change the facts, and
values only ever reach SQLite as parameters, never pasted into the SQL text: a name such as
`x' OR '1'='1` is looked up literally (an unknown person).

Each lookup borrows a connection of its own (from a pool of idle ones, or a new one when every
connection is busy) and gives it back afterwards, so lookups from many threads run side by side
and one that hangs (a slow disk, a file locked by a writer) holds only its own connection: the
lookups after it are answered as before. No lock is held while SQLite runs.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from pathlib import Path

ATTRIBUTES = ("birth_date", "birth_place", "current_address", "occupation")

_QUERY_RE = re.compile(r"\A\s*```sql[ \t]*\n[ \t]*FIND[ \t]+(\S+)[ \t]+FOR[ \t]+(.+?)[ \t]*\n\s*```\s*\Z")


class ToolError(Exception):
    """A query the tool cannot answer (malformed, unknown person or attribute).

    The message is meant to be shown to the model as the tool's reply, so it is one line.
    """


def format_query(attribute: str, name: str) -> str:
    """The query block for `attribute` of `name`; `parse_query` inverts it."""
    return f"```sql\nFIND {attribute} FOR {name}\n```"


def parse_query(text: str) -> tuple[str, str]:
    """(attribute, name) from a "```sql\\nFIND {attribute} FOR {name}\\n```" block."""
    match = _QUERY_RE.match(text)
    if match is None:
        raise ToolError(f"Malformed query {text!r}; expected ```sql\\nFIND <attribute> FOR <name>\\n```.")
    return match.group(1), match.group(2)


class FactsDatabase:
    """Read-only lookups in a facts `people.db`, safe from any number of threads at once.
    Usable as a context manager."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"Facts database {str(path)!r} does not exist; generate the facts data first.")
        self.path = path
        self._idle: list[sqlite3.Connection] = []  # connections no lookup is using
        self._pool_lock = threading.Lock()  # guards `_idle` and `_closed`, never held during a query
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        # as_uri() percent-encodes the path, so odd characters in it cannot break the URI.
        # check_same_thread=False: a connection serves one lookup at a time, but the next
        # lookup to borrow it may run in another thread (the engine starts a thread per call).
        return sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False)

    @contextlib.contextmanager
    def _borrow(self):
        """A connection no other lookup is using, for the duration of one lookup."""
        with self._pool_lock:
            if self._closed:
                raise sqlite3.ProgrammingError(f"Cannot look up in {str(self.path)!r}: the facts database is closed.")
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._connect()
        try:
            yield connection
        finally:
            with self._pool_lock:
                keep = not self._closed
                if keep:
                    self._idle.append(connection)
            if not keep:  # closed while this lookup ran (e.g. one that hung past its time-out)
                connection.close()

    def lookup(self, name: str, attribute: str) -> str:
        """The stored value of `attribute` for `name`."""
        if attribute not in ATTRIBUTES:
            raise ToolError(f"Unknown attribute {attribute!r}; choose one of: {', '.join(ATTRIBUTES)}.")
        # A column name cannot be a parameter; it is safe here because it is whitelisted above.
        sql = f"SELECT {attribute} FROM people WHERE name = ?"
        with self._borrow() as connection:
            row = connection.execute(sql, (name,)).fetchone()
        if row is None:
            raise ToolError(f"Unknown person {name!r}.")
        return row[0]

    def run(self, query_text: str) -> str:
        """Answer a query block with the value, or raise ToolError."""
        attribute, name = parse_query(query_text)
        return self.lookup(name, attribute)

    def close(self) -> None:
        """Close the idle connections now and each busy one when its lookup returns; never waits
        for a lookup. Lookups after this raise sqlite3.ProgrammingError."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def __enter__(self) -> "FactsDatabase":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
