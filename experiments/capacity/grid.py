"""The capacity study: which transformer shape stores the most facts at a fixed parameter budget?

    python -m lmjax.grid experiments/capacity/grid.py --parallel 2
    python experiments/capacity/analyze.py

Allen-Zhu & Li's setting ("Physics of Language Models 3.3") at the size of a 2-core CPU: the
facts task in `bio` mode (training on the biographies alone: one text of four sentences a
person, 33.3 bits a person), byte tokens, every fact seen EXPOSURES times, and the bits a model
stores read from its loss on the values (`eval/bio_bits`, lmjax.results.capacity.stored_bits).

Two parts, one grid:
  shapes   at budgets of ~10k, ~20k and ~40k parameters (embeddings counted): layers 1/2/4/8 x
           heads 1/2/4, the width that meets the budget (lmjax.models.budget.matched_width:
           the width on the grid of head widths, then the MLP's hidden width fitted to land
           within 1% of the budget), 256 people (8.5k bits);
  scaling  the 2-layer, 2-head shape at ~10k/20k/40k/80k parameters x 128/256/512 people.
Shapes left out: heads narrower than 4, shapes whose MLP would have to be under 2x or over
7.5x the width to meet the budget (at ~10k, 4 heads of 4 already take a 16-wide model with
little MLP left), and below ~40k, 4- and 8-layer shapes with more than one head (to fit the
time: see `_affordable`). Second seed: the shapes listed in SECOND_SEED (the two best of ~40k and
~20k in the first pass); TWICE_THE_PEOPLE: ~40k's best shapes again at 512 people, where capacity
binds (see README.md).

Exposures: 200 (the issue asks for >= 100; at 100 the models here store almost nothing, see
README.md). Steps = exposures x people / bios a step (4 rows of 448 tokens hold 11.96 bios on
average, measured from the packer). Small batches learn more per exposure here, at the same
tokens per second (calibration in README.md).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: lmjax importable

from lmjax.models.budget import matched_width  # noqa: E402

# Sizes: "cpu" is the study as run here (README.md); "cluster" is the same question at the sizes
# of the published work, for `--launcher slurm` (CAPACITY_SIZES=cluster, CAPACITY_EXPOSURES=100
# or 1000): budgets 25k-100k (and 400k in the scaling part), 1-8 layers x 1-8 heads, people
# enough for 2 bits a parameter (capacity binds at any exposure count), three seeds throughout.
SIZES = {
    "cpu": dict(
        exposures=200, shape_budgets=(10_000, 20_000, 40_000), scaling_budgets=(10_000, 20_000, 40_000, 80_000),
        layers=(1, 2, 4, 8), heads=(1, 2, 4), shape_people=None, scaling_people=(128, 256, 512), seeds=(0, 1),
        all_shapes=False,
    ),
    "cluster": dict(
        exposures=int(os.environ.get("CAPACITY_EXPOSURES", "1000")), shape_budgets=(25_000, 50_000, 100_000),
        scaling_budgets=(25_000, 50_000, 100_000, 200_000, 400_000), layers=(1, 2, 3, 4, 6, 8), heads=(1, 2, 4, 8),
        shape_people=(1_500, 3_000, 6_000), scaling_people=(1_000, 2_000, 4_000, 8_000), seeds=(0, 1, 2),
        all_shapes=True,
    ),
}
SIZE = os.environ.get("CAPACITY_SIZES", "cpu")
S = SIZES[SIZE]
EXPOSURES = S["exposures"]
BIOS_PER_STEP = 11.96  # 4 rows x 448 tokens, first-fit packed (README.md: how it was measured)
SHAPE_BUDGETS, SCALING_BUDGETS = S["shape_budgets"], S["scaling_budgets"]
LAYERS, HEADS = S["layers"], S["heads"]
# People in the shape sweep, one count per budget (cpu: 256 at every budget, 8.5k bits).
SHAPE_PEOPLE = dict(zip(SHAPE_BUDGETS, S["shape_people"] or (256,) * len(SHAPE_BUDGETS)))
SCALING_PEOPLE = S["scaling_people"]
MIN_HEAD_DIM, MLP_RATIO_RANGE = 4, (2.0, 7.5)
# Shape labels run with seed 1 too: the best two shapes of each budget in the first pass (README.md).
SECOND_SEED = {"b40k_L4_H4", "b40k_L4_H2", "b20k_L2_H2", "b20k_L2_H4"}
# Shapes that stored (nearly) every fact at their budget's people count in the first pass: run
# again with twice the people, where capacity binds and their ranking can be read (README.md).
TWICE_THE_PEOPLE = {"b40k_L4_H4", "b40k_L4_H2"}
# Left out once the first pass showed how long it would take (README.md: what was traded).
SKIPPED = {("b20k_L8_H1", 256), ("b10k_L2_H2", 512)} if SIZE == "cpu" else set()


def shape_label(budget, n_layers, n_heads):
    return f"b{budget // 1000}k_L{n_layers}_H{n_heads}"


def shapes() -> dict:
    """Shape label -> model overrides, for every budget, layer and head count kept."""
    out = {}  # the slowest first (large, deep, many heads), so that 2 parallel slots finish together
    for budget in sorted(set(SHAPE_BUDGETS) | set(SCALING_BUDGETS), reverse=True):
        for n_layers in sorted(LAYERS, reverse=True):
            for n_heads in sorted(HEADS, reverse=True):
                s = matched_width(budget, n_layers=n_layers, n_heads=n_heads, min_head_dim=MIN_HEAD_DIM, fit_mlp=True)
                ratio = s.mlp_hidden / s.dim
                if not MLP_RATIO_RANGE[0] <= ratio <= MLP_RATIO_RANGE[1] or not _affordable(budget, n_layers, n_heads):
                    continue
                out[shape_label(budget, n_layers, n_heads)] = {
                    "model.n_layers": n_layers, "model.n_heads": n_heads, "model.n_kv_heads": n_heads,
                    "model.dim": s.dim, "model.mlp_hidden": s.mlp_hidden,
                }
    return out


def _affordable(budget, n_layers, n_heads) -> bool:
    """Below ~40k, 4 and 8 layers run with one head only: at 8-14 wide, more heads cost the most
    time a step (many narrow heads) for the least information; every head count runs at ~40k."""
    return S["all_shapes"] or budget >= 40_000 or n_layers <= 2 or n_heads == 1


def _in_study(labels) -> bool:
    budget, n_layers, n_heads = _parse(labels["shape"])
    people, seed = labels["data.num_people"], labels["seed"]
    shape_part = SHAPE_PEOPLE.get(budget) == people or (
        labels["shape"] in TWICE_THE_PEOPLE and people == 2 * SHAPE_PEOPLE.get(budget, 0))
    scaling_part = budget in SCALING_BUDGETS and n_layers == 2 and n_heads == 2 and people in SCALING_PEOPLE
    if (labels["shape"], people) in SKIPPED:
        return False
    if seed != 0 and not S["all_shapes"]:  # the second seed at the sweep's people count only
        return SHAPE_PEOPLE.get(budget) == people and labels["shape"] in SECOND_SEED
    return shape_part or scaling_part


def _parse(label):
    budget, layers, heads = label.split("_")
    return int(budget[1:-1]) * 1000, int(layers[1:]), int(heads[1:])


def _steps(people):
    return round(EXPOSURES * people / BIOS_PER_STEP)


def get_grid():
    return dict(
        name="capacity" if SIZE == "cpu" else f"capacity_{SIZE}_e{EXPOSURES}",
        config="configs/facts.py",
        root="runs/capacity" if SIZE == "cpu" else f"runs/capacity_{SIZE}_e{EXPOSURES}",
        fixed={
            "data.mode": "bio", "eval.recall": False, "train.stop_when": "",
            "train.seq_len": 448, "train.batch_size": 4, "optim.lr": 3e-3,
            "checkpoint.every": 2000, "logging.progress_bar": False, "logging.tensorboard": False,
        },
        axes={"shape": shapes(), "data.num_people": sorted(set(SCALING_PEOPLE) | set(SHAPE_PEOPLE.values()), reverse=True)},
        seeds=list(S["seeds"]),
        derive=lambda o: {
            "train.steps": _steps(o["data.num_people"]),
            "train.eval_every": max(1, _steps(o["data.num_people"]) // 6),
        },
        where=_in_study,
    )
