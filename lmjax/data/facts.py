"""The facts task: a synthetic population, its SQLite database and the dialog files.

Everything is a pure function of (num_people, seed, num_unseen, alpha), drawn from one
`numpy.random.default_rng(seed)` in a fixed order, so the same parameters always give
byte-identical files.

Files written to the output folder:
  people.db              table people(name, birth_date, birth_place, current_address, occupation)
                         with trained AND unseen people (the tool must answer for both)
  biographies.jsonl      trained people, one assistant turn with one sentence per attribute
  qa.jsonl               trained people x attributes: question -> answer sentence
  qatool.jsonl           same questions, answered through a database query turn
  qa_unseen.jsonl        unseen people, never in any training file (evaluation only)
  qatool_unseen.jsonl    idem, for the in-tool recall on out-of-distribution names
  meta.json              parameters and counts

`people_id` indexes one list of all people: trained first (0..num_people-1), unseen after.

Correlated variant (alpha): attributes are drawn in ATTRIBUTES order. birth_date is always
uniform. Each later attribute, with probability alpha, is drawn from a narrow window that
depends on the previous attribute, otherwise uniformly from its list. The window holds
`max(1, n // 10)` consecutive values (wrapping) of the n-value list, starting at index
`prev_index * n // n_prev`, where prev_index is the previous value's index in its own list of
n_prev values (for birth_date: birth year - 1950, n_prev = 51). So people born in nearby years
come from nearby countries in COUNTRIES, people from one country live in a band of CITIES,
and people in one city share a band of OCCUPATIONS. All random arrays are drawn whatever
alpha is, so two alphas with the same seed share names and every non-correlated draw.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import numpy as np

from lmjax import cli
from lmjax.dialog import tool_call_turns
from lmjax.tools.facts_db import ATTRIBUTES, FactsDatabase, format_query

# Bump when the generated content changes, so old caches are not reused.
GENERATOR_VERSION = 1

FIRST_NAMES = (
    "Ada", "Alan", "Alice", "Amara", "Anna", "Arjun", "Astrid", "Beatrice", "Boris", "Carla",
    "Carlos", "Chen", "Chloe", "Clara", "Daniel", "Dario", "Diego", "Elena", "Elif", "Emma",
    "Erik", "Fatima", "Felix", "Fiona", "Gabriel", "Greta", "Hana", "Hassan", "Helen", "Hugo",
    "Ines", "Irene", "Isaac", "Ivan", "Jack", "Jana", "Javier", "Jonas", "Julia", "Kai",
    "Karim", "Kenji", "Laila", "Lars", "Laura", "Leo", "Lina", "Lucas", "Luna", "Maria",
    "Marco", "Maya", "Mei", "Mila", "Milan", "Nadia", "Naomi", "Nico", "Nina", "Noah",
    "Olga", "Omar", "Oscar", "Paula", "Pedro", "Priya", "Rafael", "Rania", "Rosa", "Ruben",
    "Sara", "Sean", "Sofia", "Stefan", "Tariq", "Tessa", "Theo", "Tomas", "Uma", "Valentina",
    "Victor", "Vera", "Wei", "Wendy", "Xavier", "Yara", "Yusuf", "Zara", "Zoe", "Aiko",
    "Bruno", "Dina", "Emil", "Farah", "Goran", "Ingrid", "Kofi", "Lucia", "Mateo", "Nora",
)

LAST_NAMES = (
    "Abbott", "Adeyemi", "Alvarez", "Andersen", "Bauer", "Becker", "Bergstrom", "Bianchi", "Brennan", "Castillo",
    "Chowdhury", "Costa", "Dubois", "Duarte", "Eriksson", "Fischer", "Fontaine", "Garcia", "Gomez", "Grant",
    "Haddad", "Hansen", "Hartmann", "Herrera", "Hoffman", "Ibrahim", "Ivanova", "Jensen", "Kaminski", "Kato",
    "Keller", "Kim", "Kowalski", "Kruger", "Lambert", "Larsen", "Laurent", "Lindqvist", "Lopez", "Mancini",
    "Marsh", "Martins", "Mendes", "Meyer", "Moreau", "Morales", "Nakamura", "Navarro", "Nguyen", "Novak",
    "Nowak", "Okafor", "Olsen", "Ortega", "Osei", "Park", "Patel", "Pereira", "Petrov", "Quinn",
    "Ramos", "Reyes", "Ricci", "Rossi", "Russo", "Sato", "Schmidt", "Schneider", "Silva", "Singh",
    "Sokolov", "Suzuki", "Tanaka", "Torres", "Varga", "Vasquez", "Vogel", "Wagner", "Walsh", "Weber",
    "Wolf", "Yamamoto", "Yilmaz", "Zhang", "Ziegler", "Acosta", "Banerjee", "Carter", "Delgado", "Ellis",
    "Farouk", "Greco", "Horvath", "Iyer", "Jovanovic", "Khan", "Lund", "Mbeki", "Nilsson", "Oliveira",
)

COUNTRIES = (
    "Argentina", "Australia", "Brazil", "Canada", "Chile", "China", "Egypt", "France", "Germany", "Ghana",
    "Greece", "India", "Indonesia", "Ireland", "Italy", "Japan", "Kenya", "Mexico", "Morocco", "the Netherlands",
    "Nigeria", "Norway", "Peru", "Poland", "Portugal", "South Korea", "Spain", "Sweden", "Turkey", "Vietnam",
)

CITIES = (
    "Amsterdam", "Athens", "Auckland", "Austin", "Baltimore", "Bangkok", "Barcelona", "Beijing", "Belgrade", "Berlin",
    "Bern", "Bilbao", "Birmingham", "Bogota", "Bologna", "Bordeaux", "Boston", "Bratislava", "Brisbane", "Bristol",
    "Brussels", "Bucharest", "Budapest", "Buenos Aires", "Busan", "Cairo", "Calgary", "Cape Town", "Caracas", "Cardiff",
    "Casablanca", "Chennai", "Chicago", "Cologne", "Copenhagen", "Cordoba", "Dakar", "Dallas", "Delhi", "Denver",
    "Detroit", "Dhaka", "Dubai", "Dublin", "Durban", "Edinburgh", "Florence", "Frankfurt", "Fukuoka", "Geneva",
    "Genoa", "Glasgow", "Gothenburg", "Granada", "Guadalajara", "Hamburg", "Hanoi", "Havana", "Helsinki", "Hong Kong",
    "Honolulu", "Houston", "Istanbul", "Izmir", "Jakarta", "Johannesburg", "Kampala", "Karachi", "Kyiv", "Kolkata",
    "Krakow", "Kyoto", "Lagos", "Lahore", "Leeds", "Leipzig", "Lima", "Lisbon", "Liverpool", "Ljubljana",
    "London", "Los Angeles", "Lyon", "Madrid", "Malaga", "Manchester", "Manila", "Marseille", "Medellin", "Melbourne",
    "Miami", "Milan", "Minneapolis", "Monterrey", "Montevideo", "Montreal", "Moscow", "Mumbai", "Munich", "Nagoya",
    "Nairobi", "Nantes", "Naples", "Nashville", "New Orleans", "New York", "Nice", "Osaka", "Oslo", "Ottawa",
    "Palermo", "Paris", "Perth", "Philadelphia", "Phoenix", "Porto", "Prague", "Quebec City", "Quito", "Recife",
    "Reykjavik", "Riga", "Rio de Janeiro", "Rome", "Rotterdam", "Salvador", "San Diego", "San Francisco", "Santiago", "Sao Paulo",
    "Sapporo", "Seattle", "Seoul", "Seville", "Shanghai", "Shenzhen", "Singapore", "Sofia", "Stockholm", "Stuttgart",
    "Sydney", "Taipei", "Tallinn", "Tampa", "Tangier", "Tehran", "Tel Aviv", "Tokyo", "Toronto", "Toulouse",
    "Tunis", "Turin", "Utrecht", "Valencia", "Vancouver", "Venice", "Vienna", "Vilnius", "Warsaw", "Wellington",
    "Winnipeg", "Wroclaw", "Zagreb", "Zurich", "Accra", "Adelaide", "Alexandria", "Antwerp", "Asuncion", "Atlanta",
    "Bangalore", "Basel", "Bergen", "Bremen", "Brno", "Cebu", "Charlotte", "Cleveland", "Cusco", "Dortmund",
    "Gdansk", "Ghent", "Graz", "Hyderabad", "Incheon", "Kobe", "La Paz", "Las Vegas", "Lille", "Luxembourg",
    "Lucerne", "Macau", "Malmo", "Marrakesh", "Montpellier", "Nuremberg", "Oaxaca", "Orlando", "Pittsburgh", "Portland",
)

OCCUPATIONS = (
    "accountant", "actor", "architect", "astronaut", "astronomer", "baker", "banker", "barber", "biologist", "blacksmith",
    "bookkeeper", "botanist", "bricklayer", "butcher", "carpenter", "cartographer", "chef", "chemist", "choreographer", "civil engineer",
    "dentist", "designer", "detective", "dietitian", "diplomat", "economist", "editor", "electrician", "engineer", "farmer",
    "firefighter", "fisherman", "florist", "gardener", "geologist", "glassblower", "graphic designer", "historian", "illustrator", "interpreter",
    "janitor", "jeweler", "journalist", "judge", "lawyer", "librarian", "lifeguard", "linguist", "locksmith", "machinist",
    "mathematician", "mechanic", "meteorologist", "midwife", "miner", "musician", "nurse", "optician", "painter", "paramedic",
    "pharmacist", "philosopher", "photographer", "physicist", "physiotherapist", "pilot", "plumber", "poet", "police officer", "potter",
    "professor", "programmer", "psychologist", "radiologist", "receptionist", "sailor", "sculptor", "secretary", "shoemaker", "singer",
    "social worker", "software developer", "statistician", "surgeon", "surveyor", "tailor", "teacher", "translator", "truck driver", "tutor",
    "upholsterer", "veterinarian", "violinist", "waiter", "watchmaker", "weaver", "welder", "writer", "zoologist", "zookeeper",
)

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
FIRST_YEAR, LAST_YEAR = 1950, 2000
MAX_DAY = 28  # every month has a 28th, so day and month can be drawn independently

QUESTIONS = {
    "birth_date": "When was {name} born?",
    "birth_place": "Where was {name} born?",
    "current_address": "Where does {name} live?",
    "occupation": "What does {name} do for a living?",
}

# attribute -> every value an answer about it can state (birth dates are drawn, not listed: no
# date is the tail of another, so a word boundary decides for them). Recall needs them to tell
# "a civil engineer." from "an engineer.".
ATTRIBUTE_VALUES = {"birth_place": COUNTRIES, "current_address": CITIES, "occupation": OCCUPATIONS}

DIALOG_FILES = ("biographies", "qa", "qatool", "qa_unseen", "qatool_unseen")


# ----------------------------------------------------------------------------- population


def validate_params(num_people, seed, num_unseen, alpha, *, prefix="") -> None:
    """Raise ValueError with a one-line message on parameters that cannot make a population;
    `prefix` goes before each parameter's name (the config's "data.")."""
    k = {name: prefix + name for name in ("num_people", "num_unseen", "seed", "alpha")}
    if isinstance(num_people, bool) or not isinstance(num_people, (int, np.integer)) or num_people <= 0:
        raise ValueError(f"{k['num_people']} must be a positive integer, got {num_people!r}.")
    if isinstance(num_unseen, bool) or not isinstance(num_unseen, (int, np.integer)) or num_unseen < 0:
        raise ValueError(f"{k['num_unseen']} must be a non-negative integer, got {num_unseen!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{k['seed']} must be a non-negative integer, got {seed!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{k['alpha']} must lie in [0, 1], got {alpha!r}.")
    available = len(FIRST_NAMES) * len(LAST_NAMES)
    if num_people + num_unseen > available:
        raise ValueError(
            f"Asked for {num_people} + {num_unseen} unseen people but only {available} distinct "
            f"first x last names exist; lower {k['num_people']} or {k['num_unseen']}."
        )


def render_birth_date(day: int, month: int, year: int) -> str:
    return f"{MONTHS[month - 1]} {day}, {year}"


def _draw_correlated(rng, alpha, num, prev_index, num_prev, num_values):
    """Indices into a list of num_values, each tied to prev_index with probability alpha."""
    is_correlated = rng.random(num) < alpha
    uniform = rng.integers(0, num_values, size=num)
    window = max(1, num_values // 10)
    offset = rng.integers(0, window, size=num)
    correlated = (prev_index * num_values // num_prev + offset) % num_values
    return np.where(is_correlated, correlated, uniform)


def build_population(num_people: int, seed: int, num_unseen: int = 64, alpha: float = 0.0) -> list[dict]:
    """All people, trained first then unseen: dicts with "name" and one key per attribute."""
    validate_params(num_people, seed, num_unseen, alpha)
    rng = np.random.default_rng(seed)
    total = num_people + num_unseen
    pair_ids = rng.permutation(len(FIRST_NAMES) * len(LAST_NAMES))[:total]
    names = [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}" for i in pair_ids]

    days = rng.integers(1, MAX_DAY + 1, size=total)
    months = rng.integers(1, 13, size=total)
    years = rng.integers(FIRST_YEAR, LAST_YEAR + 1, size=total)
    num_years = LAST_YEAR - FIRST_YEAR + 1
    place_ids = _draw_correlated(rng, alpha, total, years - FIRST_YEAR, num_years, len(COUNTRIES))
    city_ids = _draw_correlated(rng, alpha, total, place_ids, len(COUNTRIES), len(CITIES))
    job_ids = _draw_correlated(rng, alpha, total, city_ids, len(CITIES), len(OCCUPATIONS))

    return [
        {
            "name": names[i],
            "birth_date": render_birth_date(int(days[i]), int(months[i]), int(years[i])),
            "birth_place": COUNTRIES[place_ids[i]],
            "current_address": CITIES[city_ids[i]],
            "occupation": OCCUPATIONS[job_ids[i]],
        }
        for i in range(total)
    ]


# ----------------------------------------------------------------------------- sentences


def answer_sentence(name: str, attribute: str, value: str) -> str:
    """The sentence stating one fact; it always ends with f"{value}."."""
    if attribute == "birth_date":
        return f"{name} was born on {value}."
    if attribute == "birth_place":
        return f"{name} was born in {value}."
    if attribute == "current_address":
        return f"{name} lives in {value}."
    if attribute == "occupation":
        article = "an" if value[0] in "aeiou" else "a"
        return f"{name} works as {article} {value}."
    raise ValueError(f"Unknown attribute {attribute!r}; choose one of: {', '.join(ATTRIBUTES)}.")


def scored_value(attribute: str, value: str) -> str:
    """The end of a fact's sentence that carries the fact: the value, with its article for an
    occupation (the article, written first, already tells a vowel from a consonant)."""
    sentence = answer_sentence("", attribute, value)
    return sentence[sentence.rindex(" as ") + 4 : -1] if attribute == "occupation" else value


def biography_prefix_records(people_id: int, person: dict) -> list[dict]:
    """One record per attribute: the biography up to and including that attribute's sentence,
    answered by its `scored_value`. A model trained on the biographies recalls the fact when it
    writes the value after that prefix."""
    sentences = [answer_sentence(person["name"], a, person[a]) for a in ATTRIBUTES]
    return [
        {
            "dialog": [{"source": "assistant", "content": " ".join(sentences[: k + 1])}],
            "people_id": people_id,
            "attribute": attribute,
            "answer": scored_value(attribute, person[attribute]),
        }
        for k, attribute in enumerate(ATTRIBUTES)
    ]


def biography_dialog(people_id: int, person: dict) -> dict:
    text = " ".join(answer_sentence(person["name"], a, person[a]) for a in ATTRIBUTES)
    return {
        "dialog": [{"source": "assistant", "content": text}],
        "people_id": people_id,
        "attribute": "all",
        "answer": "",
    }


def qa_dialog(people_id: int, person: dict, attribute: str) -> dict:
    name, value = person["name"], person[attribute]
    return {
        "dialog": [
            {"source": "user", "content": QUESTIONS[attribute].format(name=name)},
            {"source": "assistant", "content": answer_sentence(name, attribute, value)},
        ],
        "people_id": people_id,
        "attribute": attribute,
        "answer": value,
    }


def qatool_dialog(people_id: int, person: dict, attribute: str, database: FactsDatabase) -> dict:
    """Question, query block, the tool's real reply, answer sentence built from that reply."""
    return qatool_record(people_id, person, attribute, database.run(format_query(attribute, person["name"])))


def qatool_record(people_id: int, person: dict, attribute: str, reply: str) -> dict:
    name = person["name"]
    return {
        "dialog": [
            {"source": "user", "content": QUESTIONS[attribute].format(name=name)},
            *tool_call_turns(format_query(attribute, name), reply),
            {"source": "assistant", "content": answer_sentence(name, attribute, reply)},
        ],
        "people_id": people_id,
        "attribute": attribute,
        "answer": reply,
    }


def tool_practice_dialogs(num: int, seed: int, exclude_names) -> list[dict]:
    """qatool dialogs about `num` extra people who are in no database and no eval set.

    In-tool training on only N people lets a model memorise their replies instead of learning
    to copy the tool's reply; these people make memorising pointless. Their `people_id`s are
    negative. The same (num, seed, exclude_names) always gives the same dialogs.
    """
    exclude = set(exclude_names)
    pool = len(FIRST_NAMES) * len(LAST_NAMES)
    if num + len(exclude) > pool:
        raise ValueError(f"Only {pool - len(exclude)} names are left for {num} practice people; lower the number.")
    drawn = build_population(num + len(exclude), seed + 1, num_unseen=0)
    people = [p for p in drawn if p["name"] not in exclude][:num]
    return [qatool_record(-1 - i, person, a, person[a]) for i, person in enumerate(people) for a in ATTRIBUTES]


# ----------------------------------------------------------------------------- files


def write_database(path: Path, people: list[dict]) -> None:
    path.unlink(missing_ok=True)
    with closing(sqlite3.connect(path)) as connection:
        connection.execute(
            "CREATE TABLE people(name TEXT PRIMARY KEY, birth_date TEXT, birth_place TEXT,"
            " current_address TEXT, occupation TEXT)"
        )
        connection.executemany(
            "INSERT INTO people VALUES (?, ?, ?, ?, ?)",
            [(p["name"], *(p[a] for a in ATTRIBUTES)) for p in people],
        )
        connection.commit()


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_dialogs(path: str | Path) -> list[dict]:
    """All records of a dialog JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate_facts(out_dir: str | Path, *, num_people: int, seed: int, num_unseen: int = 64, alpha: float = 0.0) -> Path:
    """Write the database, dialog files and meta.json into out_dir (created if missing)."""
    people = build_population(num_people, seed, num_unseen, alpha)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_database(out_dir / "people.db", people)

    trained_ids = range(num_people)
    unseen_ids = range(num_people, num_people + num_unseen)
    with FactsDatabase(out_dir / "people.db") as database:
        dialogs = {
            "biographies": [biography_dialog(i, people[i]) for i in trained_ids],
            "qa": [qa_dialog(i, people[i], a) for i in trained_ids for a in ATTRIBUTES],
            "qatool": [qatool_dialog(i, people[i], a, database) for i in trained_ids for a in ATTRIBUTES],
            "qa_unseen": [qa_dialog(i, people[i], a) for i in unseen_ids for a in ATTRIBUTES],
            "qatool_unseen": [qatool_dialog(i, people[i], a, database) for i in unseen_ids for a in ATTRIBUTES],
        }
    for name in DIALOG_FILES:
        write_jsonl(out_dir / f"{name}.jsonl", dialogs[name])

    meta = {
        "params": _normalized_params(num_people=num_people, seed=seed, num_unseen=num_unseen, alpha=alpha),
        "attributes": list(ATTRIBUTES),
        "counts": {"people": num_people, "unseen": num_unseen, **{n: len(d) for n, d in dialogs.items()}},
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _normalized_params(*, num_people: int, seed: int, num_unseen: int = 64, alpha: float = 0.0) -> dict:
    """Params with defaults filled in and plain types, so equal requests hash equally."""
    return {
        "num_people": int(num_people),
        "seed": int(seed),
        "num_unseen": int(num_unseen),
        "alpha": float(alpha),
        "version": GENERATOR_VERSION,
    }


def cache_dir_name(**params) -> str:
    params = _normalized_params(**params)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return f"facts-{digest}"


def load_or_generate(cache_root: str | Path, **params) -> Path:
    """Folder holding the facts for `params`, generating it once under cache_root.

    Generation goes into a temporary sibling folder renamed into place at the end, so a crash
    leaves no half-written cache, and concurrent processes (e.g. several hosts on a shared
    disk) at worst generate twice: the first rename wins, the loser discards its copy.
    """
    cache_root = Path(cache_root)
    final_dir = cache_root / cache_dir_name(**params)
    if (final_dir / "meta.json").is_file():
        return final_dir
    validate_params(
        params.get("num_people"), params.get("seed"), params.get("num_unseen", 64), params.get("alpha", 0.0)
    )
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-tmp-", dir=cache_root))
    try:
        generate_facts(tmp_dir, **params)
        os.rename(tmp_dir, final_dir)
    except OSError:
        if not (final_dir / "meta.json").is_file():
            raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


# ----------------------------------------------------------------------------- CLI


def parse_args(argv):
    parser = cli.ArgumentParser(prog="lmjax.data.facts", description="Generate the facts task (database + dialog files).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_people", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_unseen", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.run("lmjax.data.facts", parse_args, _generate, argv)


def _generate(args) -> int:
    out_dir = generate_facts(args.out, num_people=args.num_people, seed=args.seed, num_unseen=args.num_unseen, alpha=args.alpha)
    counts = json.loads((out_dir / "meta.json").read_text())["counts"]
    summary = ", ".join(f"{counts[n]} {n}" for n in DIALOG_FILES)
    print(f"Wrote facts for {args.num_people} people + {args.num_unseen} unseen to {out_dir}: {summary}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
