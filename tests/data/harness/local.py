"""Loads a task's data from JSONL files beside these YAML files, wherever the harness runs from
(the `json` loader of `datasets` reads paths relative to the working directory, and caches)."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_jsonl(data_files: dict, **_):
    """{split: file name in this folder} -> a DatasetDict; the harness passes the task's metadata too."""
    import datasets

    def rows(name):
        with open(HERE / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows(name)) for split, name in data_files.items()})
