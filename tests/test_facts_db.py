import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmjax.tools.facts_db import ATTRIBUTES, FactsDatabase, ToolError, format_query, parse_query

QUOTED_NAME = "Conan O'Brien"
INJECTION = "x' OR '1'='1"


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
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db._connection.execute("DELETE FROM people")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db._connection.execute("INSERT INTO people(name) VALUES ('Eve')")
        assert db.lookup("Ada Moreau", "current_address") == "Lyon"
    assert db_path.read_bytes() == before


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


def test_shared_across_threads_and_closable(db_path):
    db = FactsDatabase(db_path)
    with ThreadPoolExecutor(8) as pool:
        values = list(pool.map(lambda i: db.lookup("Ada Moreau", ATTRIBUTES[i % 4]), range(200)))
    assert set(values) == {"March 1, 1950", "France", "Lyon", "chemist"}
    db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        db.lookup("Ada Moreau", "occupation")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="generate the facts data first"):
        FactsDatabase(tmp_path / "missing.db")
