"""The facts database tool: a model writes a query block, this answers it from SQLite.

Query syntax (exactly what the qatool dialogs teach):

    ```sql
    FIND birth_place FOR Ada Moreau
    ```

The syntax, fence included, is this tool's: the dialog format (lmjax/dialog.py) only decides
where a call sits in a dialog and hands the tool the text of the assistant turn as written.

The connection is opened read-only, so a model (or a bug) can never change the facts, and
values only ever reach SQLite as parameters, never pasted into the SQL text.
"""

from __future__ import annotations

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
    """Read-only lookups in a facts `people.db`. Usable as a context manager."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"Facts database {str(path)!r} does not exist; generate the facts data first.")
        self.path = path
        # as_uri() percent-encodes the path, so odd characters in it cannot break the URI.
        # check_same_thread=False lets the generation engine's worker threads share it; the
        # lock serialises them because one sqlite3 connection is not safe for concurrent use.
        self._connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def lookup(self, name: str, attribute: str) -> str:
        """The stored value of `attribute` for `name`."""
        if attribute not in ATTRIBUTES:
            raise ToolError(f"Unknown attribute {attribute!r}; choose one of: {', '.join(ATTRIBUTES)}.")
        # A column name cannot be a parameter; it is safe here because it is whitelisted above.
        sql = f"SELECT {attribute} FROM people WHERE name = ?"
        with self._lock:
            row = self._connection.execute(sql, (name,)).fetchone()
        if row is None:
            raise ToolError(f"Unknown person {name!r}.")
        return row[0]

    def run(self, query_text: str) -> str:
        """Answer a query block with the value, or raise ToolError."""
        attribute, name = parse_query(query_text)
        return self.lookup(name, attribute)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> "FactsDatabase":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
