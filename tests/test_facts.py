import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmjax.data import facts
from lmjax.data.facts import build_population, generate_facts, load_or_generate, read_dialogs
from lmjax.tools.facts_db import ATTRIBUTES, parse_query

NUM_PEOPLE, NUM_UNSEEN, SEED = 40, 10, 3
DIALOG_FILES = ("biographies", "qa", "qatool", "qa_unseen", "qatool_unseen")
QUESTION_RE = re.compile(r"^(?:When was|Where was|Where does|What does) (.+?) (?:born|live|do for a living)\?$")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def facts_dir(tmp_path_factory):
    return generate_facts(tmp_path_factory.mktemp("facts"), num_people=NUM_PEOPLE, seed=SEED, num_unseen=NUM_UNSEEN)


def db_rows(path):
    """name -> {attribute: value}, read with plain sqlite, independent of FactsDatabase."""
    with sqlite3.connect(path) as connection:
        rows = connection.execute(f"SELECT name, {', '.join(ATTRIBUTES)} FROM people").fetchall()
    connection.close()
    return {row[0]: dict(zip(ATTRIBUTES, row[1:])) for row in rows}


def question_name(record):
    match = QUESTION_RE.match(record["dialog"][0]["content"])
    assert match, record
    return match.group(1)


def test_built_in_lists_are_distinct_and_sized():
    for values, size in [(facts.FIRST_NAMES, 100), (facts.LAST_NAMES, 100), (facts.COUNTRIES, 30),
                         (facts.CITIES, 200), (facts.OCCUPATIONS, 100)]:
        assert len(values) == size and len(set(values)) == size
    for value in facts.FIRST_NAMES + facts.LAST_NAMES + facts.CITIES + facts.OCCUPATIONS + facts.COUNTRIES:
        assert value and "\n" not in value and not value.endswith(".")


def test_counts_and_meta(facts_dir):
    meta = json.loads((facts_dir / "meta.json").read_text())
    expected = {"biographies": NUM_PEOPLE, "qa": 4 * NUM_PEOPLE, "qatool": 4 * NUM_PEOPLE,
                "qa_unseen": 4 * NUM_UNSEEN, "qatool_unseen": 4 * NUM_UNSEEN}
    for name, count in expected.items():
        assert len(read_dialogs(facts_dir / f"{name}.jsonl")) == count
        assert meta["counts"][name] == count
    assert meta["params"]["num_people"] == NUM_PEOPLE and meta["params"]["seed"] == SEED
    assert len(db_rows(facts_dir / "people.db")) == NUM_PEOPLE + NUM_UNSEEN


def test_same_seed_gives_identical_files(facts_dir, tmp_path):
    again = generate_facts(tmp_path / "again", num_people=NUM_PEOPLE, seed=SEED, num_unseen=NUM_UNSEEN)
    for name in [f"{n}.jsonl" for n in DIALOG_FILES] + ["meta.json"]:
        assert (again / name).read_bytes() == (facts_dir / name).read_bytes(), name
    assert db_rows(again / "people.db") == db_rows(facts_dir / "people.db")


def test_different_seeds_differ(facts_dir, tmp_path):
    other = generate_facts(tmp_path / "other", num_people=NUM_PEOPLE, seed=SEED + 1, num_unseen=NUM_UNSEEN)
    assert (other / "qa.jsonl").read_bytes() != (facts_dir / "qa.jsonl").read_bytes()
    assert db_rows(other / "people.db") != db_rows(facts_dir / "people.db")


def test_every_answer_is_the_database_value(facts_dir):
    rows = db_rows(facts_dir / "people.db")
    id_to_name = {}
    for name in ("qa", "qatool", "qa_unseen", "qatool_unseen"):
        for record in read_dialogs(facts_dir / f"{name}.jsonl"):
            person = question_name(record)
            assert id_to_name.setdefault(record["people_id"], person) == person
            assert record["attribute"] in ATTRIBUTES
            assert record["answer"] == rows[person][record["attribute"]]
            assert record["dialog"][-1]["source"] == "assistant"
            assert record["dialog"][-1]["content"].endswith(f"{record['answer']}.")
    assert sorted(id_to_name) == list(range(NUM_PEOPLE + NUM_UNSEEN))


def test_biographies_state_every_fact(facts_dir):
    rows = db_rows(facts_dir / "people.db")
    records = read_dialogs(facts_dir / "biographies.jsonl")
    assert [r["people_id"] for r in records] == list(range(NUM_PEOPLE))
    for record in records:
        assert record["attribute"] == "all" and record["answer"] == ""
        (turn,) = record["dialog"]
        assert turn["source"] == "assistant"
        person = turn["content"].split(" was born on ")[0]
        values = rows[person]
        assert f"{person} was born on {values['birth_date']}." in turn["content"]
        assert f"{person} was born in {values['birth_place']}." in turn["content"]
        assert f"{person} lives in {values['current_address']}." in turn["content"]
        assert re.search(rf"{person} works as an? {values['occupation']}\.", turn["content"])


def test_qatool_structure_and_query_parses(facts_dir):
    for name in ("qatool", "qatool_unseen"):
        for record in read_dialogs(facts_dir / f"{name}.jsonl"):
            person, attribute = question_name(record), record["attribute"]
            assert [t["source"] for t in record["dialog"]] == ["user", "assistant", "database", "assistant"]
            query = record["dialog"][1]["content"]
            assert query == f"```sql\nFIND {attribute} FOR {person}\n```"
            assert parse_query(query) == (attribute, person)
            assert record["dialog"][2]["content"] == record["answer"]


def test_qa_and_qatool_share_questions_and_answers(facts_dir):
    for plain, tool in [("qa", "qatool"), ("qa_unseen", "qatool_unseen")]:
        for a, b in zip(read_dialogs(facts_dir / f"{plain}.jsonl"), read_dialogs(facts_dir / f"{tool}.jsonl")):
            assert a["dialog"][0] == b["dialog"][0] and a["dialog"][-1] == b["dialog"][-1]
            assert (a["people_id"], a["attribute"], a["answer"]) == (b["people_id"], b["attribute"], b["answer"])


def test_unseen_people_never_appear_in_training_files(facts_dir):
    unseen = {question_name(r) for r in read_dialogs(facts_dir / "qa_unseen.jsonl")}
    trained = {question_name(r) for r in read_dialogs(facts_dir / "qa.jsonl")}
    assert len(unseen) == NUM_UNSEEN and len(trained) == NUM_PEOPLE and not unseen & trained
    training_text = "".join((facts_dir / f"{n}.jsonl").read_text() for n in ("biographies", "qa", "qatool"))
    assert not [person for person in unseen if person in training_text]
    unseen_ids = {r["people_id"] for r in read_dialogs(facts_dir / "qatool_unseen.jsonl")}
    assert unseen_ids == set(range(NUM_PEOPLE, NUM_PEOPLE + NUM_UNSEEN))


def test_birth_dates_are_in_range():
    for person in build_population(300, seed=0, num_unseen=0):
        month, day, year = re.fullmatch(r"(\w+) (\d+), (\d+)", person["birth_date"]).groups()
        assert month in facts.MONTHS and 1 <= int(day) <= 28 and 1950 <= int(year) <= 2000


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_people=0, seed=0), "num_people"),
    (dict(num_people=10, seed=-1), "seed"),
    (dict(num_people=10, seed=0, alpha=1.5), "alpha"),
    (dict(num_people=9_990, seed=0, num_unseen=64), "distinct"),
])
def test_bad_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_population(**kwargs)


def test_cache_is_reused_and_keyed_by_params(tmp_path, monkeypatch):
    first = load_or_generate(tmp_path, num_people=8, seed=0, num_unseen=4)
    assert first.name.startswith("facts-") and (first / "meta.json").is_file()

    def must_not_generate(*args, **kwargs):
        raise AssertionError("cache was not reused")

    monkeypatch.setattr(facts, "generate_facts", must_not_generate)
    assert load_or_generate(tmp_path, num_people=8, seed=0, num_unseen=4, alpha=0.0) == first
    monkeypatch.undo()
    assert load_or_generate(tmp_path, num_people=8, seed=1, num_unseen=4) != first
    # Defaults are filled in before hashing, so an explicit default names the same cache.
    assert load_or_generate(tmp_path, num_people=8, seed=0) == load_or_generate(tmp_path, num_people=8, seed=0, num_unseen=64)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_crash_during_generation_leaves_no_cache(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(facts, "write_jsonl", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_or_generate(tmp_path, num_people=8, seed=0)
    assert list(tmp_path.iterdir()) == []


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmjax.data.facts", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60)


def test_cli_writes_files_and_prints_one_line(tmp_path, facts_dir):
    out = tmp_path / "cli"
    result = run_cli("--out", str(out), "--num_people", str(NUM_PEOPLE), "--seed", str(SEED),
                     "--num_unseen", str(NUM_UNSEEN), "--alpha", "0.0")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and str(out) in result.stdout
    assert (out / "qatool.jsonl").read_bytes() == (facts_dir / "qatool.jsonl").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--num_people", "0"], "num_people"),
    (["--num_people", "20000"], "distinct"),
    (["--num_people", "10", "--alpha", "2"], "alpha"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli("--out", str(tmp_path / "bad"), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("lmjax.data.facts: error:") and result.stderr.count("\n") == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# --- correlated variant: a permutation test on mutual information, written independently of
# how the generator builds its dependence. Shuffling one column breaks any dependence while
# keeping both marginals, so it gives the null distribution of the (biased) plug-in estimate.

def mutual_information(x, y):
    _, x = np.unique(x, return_inverse=True)
    _, y = np.unique(y, return_inverse=True)
    joint = np.zeros((x.max() + 1, y.max() + 1))
    np.add.at(joint, (x, y), 1)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())


def dependence_z_scores(alpha, num_people=3000, num_shuffles=30):
    people = build_population(num_people, seed=11, num_unseen=0, alpha=alpha)
    column = {a: np.array([p[a] for p in people]) for a in ATTRIBUTES}
    column["birth_year"] = np.array([p["birth_date"][-4:] for p in people])
    rng = np.random.default_rng(0)
    scores = {}
    for previous, current in [("birth_year", "birth_place"), ("birth_place", "current_address"),
                              ("current_address", "occupation")]:
        observed = mutual_information(column[previous], column[current])
        null = [mutual_information(column[previous], rng.permutation(column[current])) for _ in range(num_shuffles)]
        scores[current] = (observed - np.mean(null)) / np.std(null)
    return scores


def test_alpha_one_makes_each_attribute_depend_on_the_previous():
    for attribute, z in dependence_z_scores(alpha=1.0).items():
        assert z > 20, (attribute, z)


def test_alpha_zero_is_near_independent():
    for attribute, z in dependence_z_scores(alpha=0.0).items():
        assert abs(z) < 4, (attribute, z)
