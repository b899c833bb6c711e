"""The tool-vs-weights study: how does the smallest model that recalls >= 95% of N people's
facts grow with N, when the facts live in the weights vs in a database the model queries?

    python -m lmjax.grid experiments/tool_vs_weights/grid.py --parallel 2
    python experiments/tool_vs_weights/analyze.py

Sized for about an hour on a 2-core CPU (see README.md in this folder): 2-layer byte-level
Llama-style models of width 16/24/32/48/64 (17k/31k/50k/99k/165k parameters), 32/64/128 people
(128/256/512 facts, 4 per person), in-weight with 2 seeds and in-tool with 1. Every run stops once
teacher-forced accuracy reaches 96% (the recipe's `train.stop_when`), or at its step budget,
then measures recall by free generation (`eval/qa_recall`, the study's metric; in-tool the
database is queried for real).

Step budgets: in-weight 12 steps per person (~400 passes over the N x 4 dialogs: the budget
grows with N so that every N gets the same number of epochs); in-tool 1,500 steps for every N,
with 512 practice people (qatool dialogs about people in no database, so that copying the reply
is what training rewards; the recipe's default is 2,048, which needs ~2,500 steps).
Learning rate 3e-3 (the recipe's 1e-3 x 3): in calibration runs a 32-wide model memorised 64
people about twice as fast with it (loss 0.46 vs 1.66 at step 200).
"""


def get_grid():
    return dict(
        name="tool_vs_weights",
        config="configs/facts.py",
        root="runs/tool_vs_weights",
        fixed={
            "train.eval_every": 50, "checkpoint.every": 500, "logging.progress_bar": False,
            "logging.tensorboard": False, "data.tool_practice_people": 512, "optim.lr": 3e-3,
        },
        axes={  # the slow in-tool runs first, so that two parallel slots finish together
            "mode": {
                "tool": {"data.mode": "tool", "train.steps": 1500},
                "weights": {"data.mode": "weights"},
            },
            "data.num_people": [32, 64, 128],
            "model.dim": [16, 24, 32, 48, 64],
        },
        seeds=[0, 1],
        derive=lambda o: {
            "model.mlp_hidden": 4 * o["model.dim"],
            **({"train.steps": 12 * o["data.num_people"]} if o["data.mode"] == "weights" else {}),
        },
        # In-tool: one seed, and widths 32 and up (a 16-wide model does not learn to copy within
        # 1,500 steps in our calibration runs; each in-tool run costs ~6 minutes).
        where=lambda labels: labels["mode"] == "weights" or (labels["seed"] == 0 and labels["model.dim"] >= 32),
    )
