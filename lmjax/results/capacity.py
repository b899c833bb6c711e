"""How much information the facts task asks a model to store, in bits.

Counted from the generator's own value lists (lmjax.data.facts), so it follows them if they
change. The count is an honest approximation, not an exact measure of what a model stores:
- every attribute is taken as uniform and independent (alpha = 0); with correlated
  attributes (alpha > 0) the true content is lower;
- only the attributes are counted: the names are given in every question, so the model maps
  name -> attribute values and never has to produce a name;
- `accuracy` scales the bits linearly, as if each correctly recalled fact were stored in full
  and each missed one not at all; a model that guesses among a few candidates, or gets some
  facts right by chance (1/30 for a country), holds a little more or less than that.
Allen-Zhu & Li ("Physics of Language Models 3.3") report about 2 bits per parameter for
trained-to-capacity transformers, measured with a finer estimator; this count is the one to
compare runs of this codebase with one another.
"""
from __future__ import annotations

import math

import numpy as np

from lmjax.data.facts import CITIES, COUNTRIES, FIRST_YEAR, LAST_YEAR, MAX_DAY, MONTHS, OCCUPATIONS
from lmjax.tools.facts_db import ATTRIBUTES

FACTS_PER_PERSON = len(ATTRIBUTES)  # one fact = one (person, attribute) pair
REPORTED_BITS_PER_PARAM = 2.0  # Allen-Zhu & Li's reported knowledge capacity


def attribute_counts() -> dict[str, int]:
    """How many values each attribute can take, as `build_population` draws them."""
    return {
        # day in 1..MAX_DAY, month in 1..12, year in FIRST_YEAR..LAST_YEAR, drawn independently
        "birth_date": MAX_DAY * len(MONTHS) * (LAST_YEAR - FIRST_YEAR + 1),
        "birth_place": len(set(COUNTRIES)),
        "current_address": len(set(CITIES)),
        "occupation": len(set(OCCUPATIONS)),
    }


def attribute_bits() -> dict[str, float]:
    """log2(number of values) of each attribute: its information content when uniform."""
    counts = attribute_counts()
    assert set(counts) == set(ATTRIBUTES), "attribute_counts is out of date with facts_db.ATTRIBUTES"
    return {name: math.log2(count) for name, count in counts.items()}


def bits_per_person() -> float:
    """Bits of one person's four attributes (~33.3 bits with the current lists)."""
    return sum(attribute_bits().values())


def facts_bits(num_people, accuracy=1.0):
    """accuracy x num_people x bits_per_person(): the bits a model recalling that fraction holds.

    Uniform, independent attributes (alpha = 0) and linear in accuracy; see the module note.
    Works on numbers, numpy arrays and pandas Series alike.
    """
    return np.multiply(np.multiply(accuracy, num_people), bits_per_person())


def bits_per_param(num_people, accuracy, params):
    """facts_bits(num_people, accuracy) / params (arrays and Series broadcast)."""
    return np.divide(facts_bits(num_people, accuracy), params)


def stored_bits(num_facts, value_bits, loss_sum_nats):
    """Bits a model holds about one attribute, from its loss on the attribute's values.

    A model that knows nothing about who has which value pays value_bits = log2(number of values)
    per fact (uniform, independent values); one that knows a fact pays ~0. What it saves is
    what it stores: num_facts x value_bits - loss_sum in bits, floored at 0 (a model worse than
    uniform stores nothing). This is Allen-Zhu & Li's estimator for a uniform attribute, and it
    gives partial credit (a model that narrows a value down to a few candidates stores some
    bits) where the recall count does not. `loss_sum_nats`: the summed cross-entropy of every
    token of the values (value tokens only: the rest of the sentence carries no fact).
    """
    return np.maximum(0.0, np.subtract(np.multiply(num_facts, value_bits), np.divide(loss_sum_nats, math.log(2))))
