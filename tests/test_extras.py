"""lmjax/extras.py: a missing optional dependency is one line naming the extra to install."""
import pytest

from lmjax import cli
from lmjax.extras import MissingExtra, require


def test_missing_module_names_the_extra():
    with pytest.raises(MissingExtra, match=r"'no_such_module_for_lmjax' package.*pip install 'lmjax\[interop\]'"):
        require("no_such_module_for_lmjax", "interop")
    require("json", "interop")  # present: nothing happens


def test_entry_points_report_it_in_one_line(capsys):
    def body(args):
        require("no_such_module_for_lmjax", "interop")

    assert cli.run("lmjax.generate", lambda argv: None, body, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax.generate: error: This needs the 'no_such_module_for_lmjax' package") and err.count("\n") == 1
