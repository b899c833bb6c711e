import contextlib
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmjax.tools.facts_db import ATTRIBUTES, FactsDatabase, ToolError, format_query, parse_query

QUOTED_NAME = "Conan O'Brien"
INJECTION = "x' OR '1'='1"
SQL_SHAPED_NAMES = [INJECTION, "Robert'); DROP TABLE people;--", "Ada Moreau' --", 'Ada Moreau" OR 1=1; --']


@contextlib.contextmanager
def first_sql_statement_hangs(monkeypatch):
    """Every SQLite connection opened inside runs the first statement any of them executes until
    `release` is set: a progress handler (SQLite calls it while it executes a statement) blocks,
    so the hang sits inside `execute`, where a slow disk or a writer's lock would hold it.
    Yields (hung, release, connections): `hung` is set once the statement hangs; `connections`
    lists the connections opened. Releases the hang on the way out."""
    hung, release, first = threading.Event(), threading.Event(), threading.Lock()
    connections, real_connect = [], sqlite3.connect

    def progress():
        if first.acquire(blocking=False):  # the first statement only: the lock is never given back
            hung.set()
            release.wait()
        return 0

    def connect(*args, **kwargs):
        connection = real_connect(*args, **kwargs)
        connection.set_progress_handler(progress, 1)
        connections.append(connection)
        return connection

    monkeypatch.setattr(sqlite3, "connect", connect)
    try:
        yield hung, release, connections
    finally:
        release.set()
        monkeypatch.setattr(sqlite3, "connect", real_connect)


@pytest.fixture
def db_path(tmp_path):
    path = tmp_path / "people.db"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE people(name TEXT PRIMARY KEY, birth_date TEXT, birth_place TEXT,"
            " current_address TEXT, occupation TEXT)"
        )
        connection.execute("INSERT INTO people VALUES (?, ?, ?, ?, ?)",
                           (QUOTED_NAME, "April 18, 1963", "Ireland", "Los Angeles", "comedian"))
        connection.execute("INSERT INTO people VALUES (?, ?, ?, ?, ?)",
                           ("Ada Moreau", "March 1, 1950", "France", "Lyon", "chemist"))
    connection.close()
    return path


def test_attributes_are_the_four_columns():
    assert ATTRIBUTES == ("birth_date", "birth_place", "current_address", "occupation")


def test_lookup_with_quote_in_name_is_parameterised(db_path):
    with FactsDatabase(db_path) as db:
        assert db.lookup(QUOTED_NAME, "birth_place") == "Ireland"
        assert db.run(format_query("occupation", QUOTED_NAME)) == "comedian"
        # Pasted into SQL this would match every row; as a parameter it matches none.
        with pytest.raises(ToolError, match="Unknown person"):
            db.lookup(INJECTION, "birth_place")


def test_writes_are_refused(db_path):
    before = db_path.read_bytes()
    with FactsDatabase(db_path) as db:
        with db._borrow() as connection, pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("DELETE FROM people")
        with db._borrow() as connection, pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("INSERT INTO people(name) VALUES ('Eve')")
        assert db.lookup("Ada Moreau", "current_address") == "Lyon"
    assert db_path.read_bytes() == before


def people_rows(db_path):
    """The table's schema and rows, read with plain sqlite."""
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        schema = connection.execute("SELECT sql FROM sqlite_master WHERE name = 'people'").fetchall()
        return schema, connection.execute("SELECT * FROM people ORDER BY name").fetchall()


@pytest.mark.parametrize("name", SQL_SHAPED_NAMES)
def test_sql_shaped_names_are_looked_up_literally(db_path, name):
    before = people_rows(db_path)
    with FactsDatabase(db_path) as db:
        for attribute in ATTRIBUTES:
            with pytest.raises(ToolError, match=re.escape(f"Unknown person {name!r}.")):
                db.run(format_query(attribute, name))
        assert parse_query(format_query("occupation", name)) == ("occupation", name)
    assert people_rows(db_path) == before  # the table is there, with the same rows

    # Someone really called that is found, by exactly that name and nobody else's.
    with contextlib.closing(sqlite3.connect(db_path)) as connection, connection:
        connection.execute("INSERT INTO people VALUES (?, ?, ?, ?, ?)", (name, "May 5, 1975", "Peru", "Lima", "tester"))
    with FactsDatabase(db_path) as db:
        assert db.run(format_query("occupation", name)) == "tester"
        assert db.run(format_query("occupation", "Ada Moreau")) == "chemist"
    assert len(people_rows(db_path)[1]) == 3


def test_unknown_attribute_and_person(db_path):
    with FactsDatabase(db_path) as db:
        with pytest.raises(ToolError, match="Unknown attribute 'name; DROP TABLE people'"):
            db.lookup("Ada Moreau", "name; DROP TABLE people")
        with pytest.raises(ToolError, match="Unknown person 'Nobody'"):
            db.run(format_query("birth_date", "Nobody"))


def test_parse_query_round_trip_and_whitespace():
    assert parse_query(format_query("birth_date", "Ada Moreau")) == ("birth_date", "Ada Moreau")
    assert parse_query("  \n```sql\n  FIND occupation FOR Conan O'Brien  \n```\n ") == ("occupation", QUOTED_NAME)


@pytest.mark.parametrize("text", [
    "",
    "FIND birth_date FOR Ada Moreau",                       # no code fence
    "```sql\nFIND birth_date FOR Ada Moreau",               # unclosed fence
    "```sql\nSELECT * FROM people\n```",                    # not the FIND syntax
    "```sql\nFIND birth_date FOR\n```",                     # no name
    "```python\nFIND birth_date FOR Ada Moreau\n```",       # wrong language tag
    "```sql\nFIND birth_date FOR Ada Moreau\n``` trailing",  # text after the block
])
def test_malformed_query_raises(db_path, text):
    with pytest.raises(ToolError, match="Malformed query"):
        parse_query(text)
    with FactsDatabase(db_path) as db, pytest.raises(ToolError):
        db.run(text)


def test_shared_across_threads_and_closable(db_path, monkeypatch):
    with first_sql_statement_hangs(monkeypatch) as (_, release, connections):
        release.set()  # nothing hangs here; only count the connections
        db = FactsDatabase(db_path)
        with ThreadPoolExecutor(8) as pool:
            values = list(pool.map(lambda i: db.lookup("Ada Moreau", ATTRIBUTES[i % 4]), range(200)))
        assert set(values) == {"March 1, 1950", "France", "Lyon", "chemist"}
        assert 1 <= len(connections) <= 8  # at most one per worker thread, reused across lookups
        db.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        db.lookup("Ada Moreau", "occupation")
    for connection in connections:  # close() closed every connection it opened
        with pytest.raises(sqlite3.ProgrammingError):
            connection.execute("SELECT 1")


def test_a_hung_lookup_does_not_hold_up_the_next_ones(db_path, monkeypatch):
    # The hang is released before the pool waits for its threads, even when an assertion fails.
    with ThreadPoolExecutor(4) as pool, first_sql_statement_hangs(monkeypatch) as (hung, release, _):
        db = FactsDatabase(db_path)
        stuck = pool.submit(db.lookup, "Ada Moreau", "occupation")
        assert hung.wait(timeout=10), "the injected hang never started"
        # Lookups after the hung one, from other threads, are answered at once (not after the hang).
        later = [pool.submit(db.lookup, QUOTED_NAME, attribute) for attribute in ATTRIBUTES]
        assert [f.result(timeout=5) for f in later] == ["April 18, 1963", "Ireland", "Los Angeles", "comedian"]
        assert db.run(format_query("birth_place", "Ada Moreau")) == "France"
        assert not stuck.done()
        pool.submit(db.close).result(timeout=5)  # closing does not wait for the hung lookup either
        release.set()
        assert stuck.result(timeout=10) == "chemist"  # it finishes once released, closed meanwhile or not
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        db.lookup("Ada Moreau", "occupation")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="generate the facts data first"):
        FactsDatabase(tmp_path / "missing.db")
