"""Which model-selection objective picks configs that hold up on unseen batches?

For a finished `raycell tune` folder, pick the best trial under each objective (`val_auroc`, `valbatch_auroc`,
`val_composite`) from every trial's `history.jsonl` (last epoch, as the search scores trials),
print the picks and
write `picks.json`. Then infer + evaluate each pick on test + unseen with the CLI:

    .venv/bin/python bench/select_by_objective.py runs/lobo/tune
    raycell infer --checkpoint <pick> --data <data> --splits test,unseen --out <pick>/pred_eval
    raycell evaluate --predictions <pick>/pred_eval --out <pick>/eval_tu
"""

import json
import sys
from pathlib import Path

from raycell.train.history import read_history

OBJECTIVES = ("val_auroc", "valbatch_auroc", "val_composite")


def main(search: str) -> dict:
    """Best trial folder per objective; printed and written to `<search>/picks.json`."""
    root = Path(search)
    last = {}
    for d in sorted((root / "trials").glob("train-*")):
        hist = read_history(d / "history.jsonl")
        if hist:
            last[d] = max(hist, key=lambda r: r["epoch"])
    picks = {}
    for key in OBJECTIVES:
        d, m = max(last.items(), key=lambda kv: kv[1].get(key, float("-inf")))
        picks[key] = str(d)
        shown = {k: round(m[k], 3) for k in ("epoch", *OBJECTIVES, "val_batch_probe") if k in m}
        print(f"{key:<15} {d.name}  {shown}")
    (root / "picks.json").write_text(json.dumps(picks, indent=1) + "\n")
    return picks


if __name__ == "__main__":
    main(sys.argv[1])
