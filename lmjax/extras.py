"""Optional dependencies, named by the setup.py extra that installs them, so that a missing one
is a one-line error that says what to install, not an ImportError traceback."""
import importlib.util


class MissingExtra(ImportError):
    pass


def require(module: str, extra: str) -> None:
    """MissingExtra unless `module` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(
            f"This needs the {module!r} package, which is not installed; install it with "
            f"pip install 'lmjax[{extra}]' (pip install -e '.[{extra}]' in a checkout)."
        )
