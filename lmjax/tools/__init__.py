"""Tools a model may call during generation, by name (`--tools facts`).

A tool is built from the task's data folder and is a function query text -> reply text that
raises `ToolError` (facts_db) for a query it cannot answer. The query is the text of the
assistant turn that made the call, as the dialog format (lmjax/dialog.py) cuts it out.

The generation engine runs each call in a thread of its own and answers a call past its
time-out with an error without stopping it, so a tool is called from several threads at once
and must not make one call wait for another (the facts database: a connection per lookup).
"""
from pathlib import Path

from lmjax.registry import Registry

TOOLS = Registry("tools")


@TOOLS.register("facts")
def facts_tool(data_dir):
    from lmjax.tools.facts_db import FactsDatabase

    return FactsDatabase(Path(data_dir) / "people.db").run
