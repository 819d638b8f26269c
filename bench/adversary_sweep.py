"""Does the adversary remove the batch from the latent? A sweep of the adversarial weight.

For each seed: one synthetic data set (`effects=varied` by default, unseen batches held out), the
conventional AEC once, then the adversarial AEC for every (loss.adv_objective, loss.adv) pair. Each model
is trained by the same loop as `raycell train` (run in-process through `LocalContext`: no Ray, so the
numbers depend only on the model and the data) and judged on its test-split latents by imaging batch
(Davies-Bouldin higher and Calinski-Harabasz lower = less batch-clustered, the batch-probe accuracy
against its chance level) and by phenotype AUROC on the seen test split and on the unseen batches.

    python bench/adversary_sweep.py --seeds 0,1,2 --out bench/results/adversary_sweep
    python bench/adversary_sweep.py --quick         # one seed, two weights: a smoke run

Writes `<out>/adversary_sweep.json` (every run) and `<out>/adversary_sweep.png` (the trade-off curves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _latents(ctx, model, spec, n_batches: int, split: str) -> dict[str, np.ndarray]:
    """Latents, phenotype probabilities, labels and batch codes of one split (eval mode, no gradient)."""
    import torch

    from raycell.losses import label_prob
    from raycell.models.random_effects import one_hot_design

    model.eval()
    zs, ps, ys, bs = [], [], [], []
    with torch.no_grad():
        for mb in ctx.minibatches(split, 0, train=False):
            out = model(spec.to_float(mb["x"]), one_hot_design(mb["b"], n_batches))
            zs.append(out.latent.float().numpy())
            ps.append(label_prob(out.logits).float().numpy())
            ys.append(mb["y"].numpy())
            bs.append(mb["b"].numpy())
    return {
        "z": np.concatenate(zs),
        "p": np.concatenate(ps),
        "y": np.concatenate(ys),
        "b": np.concatenate(bs),
    }


def one_run(
    data: Path,
    work: Path,
    model: str,
    objective: str,
    adv: float,
    seed: int,
    epochs: int,
    crop: int,
    reads: str = "all",
    adv_steps: int = 1,
    extra: tuple[str, ...] = (),
) -> dict:
    """Train one model in-process and measure its test latents and AUROCs."""
    import torch
    from sklearn.metrics import roc_auc_score

    from raycell.config import load_config
    from raycell.data.dataset import CropCollate
    from raycell.formats.checkpoint import find_checkpoint
    from raycell.metrics.latent import (
        batch_clustering,
        batch_probe_accuracy,
        batch_probe_within_label,
    )
    from raycell.models.checkpoint import load_checkpoint
    from raycell.train.context import LocalContext
    from raycell.train.loop import run_training
    from raycell.train.trainer import training_setup

    torch.set_num_threads(1)
    if model == "conventional":  # it has no adversary: the adversary's options do not apply
        extra = tuple(x for x in extra if not x.startswith(("model.args.", "loss.adv")))
    tag = "".join(x.replace("=", "").replace(".", "") for x in extra)
    run = work / f"{model}-{objective}-{reads}-{adv_steps}-{adv:g}-s{seed}{tag}"
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            "model.preset=small" if crop >= 64 else "model.preset=tiny",
            f"model.type={model}",
            f"train.epochs={epochs}",
            f"seed={seed}",
            f"loss.adv={adv}",
            f"loss.adv_objective={objective}",
            "ray.progress=false",
            f"train.runs_dir={run}",
            "train.torch_threads=1",
            f"loss.adv_steps={adv_steps}",
        ]
        + ([f"model.args.adversary_reads={reads}"] if model != "conventional" else [])
        + list(extra),
    )
    setup, ds = training_setup(cfg)
    col = CropCollate(setup.data_spec, setup.labels, setup.batches)
    ctx = LocalContext(ds, col, cfg.data.batch_size, cfg.data.eval_batch_size, run)
    t0 = time.perf_counter()
    run_training(ctx, cfg, setup)
    model_nn, _ = load_checkpoint(find_checkpoint(run))
    res = {
        "model": model,
        "objective": objective,
        "adv": adv,
        "align": float(dict(x.split("=", 1) for x in extra).get("loss.align", 0.0)),
        "reads": reads,
        "adv_steps": adv_steps,
        "set": list(extra),
        "seed": seed,
        "epochs": epochs,
        "train_s": round(time.perf_counter() - t0, 1),
        "history_last": ctx.history[-1],
    }
    spec, n_b = setup.data_spec, len(setup.batches)
    test = _latents(ctx, model_nn, spec, n_b, "test")
    bt = test["b"]
    res.update(
        {f"test_{k}": v for k, v in batch_clustering(test["z"], bt).items()}
    )  # z-scores itself
    # the scale of the latent: an encoder can shrink the directions an unnormalised adversary reads
    sd = test["z"].std(0)
    res["test_latent_sd_mean"] = float(sd.mean())
    res["test_latent_sd_min"] = float(sd.min())
    res["val_adv_acc"] = ctx.history[-1].get("val_adv_acc", float("nan"))
    probe = batch_probe_accuracy(test["z"], bt, seed=seed)
    res["test_batch_probe"] = probe["batch_probe_acc"]
    res["test_batch_probe_chance"] = probe["chance"]
    within = batch_probe_within_label(test["z"], test["y"], bt, seed=seed)
    res["test_probe_within_label"] = within["batch_probe_acc"]
    res["test_probe_within_label_chance"] = within["chance"]
    res["test_auroc"] = float(roc_auc_score(test["y"], test["p"]))
    unseen = _latents(ctx, model_nn, spec, n_b, "unseen")
    res["unseen_auroc"] = float(roc_auc_score(unseen["y"], unseen["p"]))
    return res


def make_data(root: Path, seed: int, n_cells: int, crop: int, effects: str) -> Path:
    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic

    out = root / f"data-s{seed}"
    if not (out / "dataset.json").is_file():
        write_synthetic(
            str(out), n_cells=n_cells, crop_size=crop, seed=seed, effects=effects, progress=False
        )
        split_dataset(str(out))
    return out


def plot(runs: list[dict], path: Path, x: str = "adv") -> None:
    """The trade-off curves: each latent measure and AUROC against `x` (loss.adv or loss.align), mean
    and s.d. over seeds, the conventional model and chance as lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = [r for r in runs if r["model"] == "conventional"]
    panels = [
        ("test_db", "Davies-Bouldin by batch (higher: less batch)", None),
        ("test_batch_probe", "batch probe accuracy (lower: less batch)", "test_batch_probe_chance"),
        (
            "test_probe_within_label",
            "batch probe within a phenotype (lower: less batch)",
            "test_probe_within_label_chance",
        ),
        ("test_auroc", "phenotype AUROC, seen batches (test)", None),
        ("unseen_auroc", "phenotype AUROC, unseen batches", None),
    ]
    panels = [p for p in panels if all(p[0] in r for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    series = sorted({(r["model"], r["objective"]) for r in runs if r["model"] != "conventional"})
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for (model, objective), colour in zip(series, colours * 4):
        rs = [r for r in runs if (r["model"], r["objective"]) == (model, objective)]
        ws = sorted({r.get(x, 0.0) for r in rs})
        for ax, (key, _, _) in zip(axes, panels):
            m = [np.mean([r[key] for r in rs if r.get(x, 0.0) == w]) for w in ws]
            s = [np.std([r[key] for r in rs if r.get(x, 0.0) == w]) for w in ws]
            if ws:
                ax.errorbar(
                    ws,
                    m,
                    yerr=s,
                    marker="o",
                    color=colour,
                    capsize=3,
                    label=f"{model}, {objective}",
                )
    for ax, (key, title, chance) in zip(axes, panels):
        if conv:
            ax.axhline(np.mean([r[key] for r in conv]), color="0.3", ls="--", label="conventional")
        if chance:
            ax.axhline(np.mean([r[chance] for r in runs]), color="0.6", ls=":", label="chance")
        xs = sorted({r.get(x, 0.0) for r in runs if r["model"] != "conventional"})
        if xs and xs[0] == 0 and len(xs) > 1:  # 0 (the term off) on the axis too
            ax.set_xscale("symlog", linthresh=xs[1])
        else:
            ax.set_xscale("log")
        ax.set_xlabel(f"loss.{x}")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--weights", default="0.03,0.1,0.3,1,3")
    ap.add_argument("--objectives", default="subtract,confusion")
    ap.add_argument(
        "--reads",
        default="all,latent",
        help="what the adversary reads (model.args.adversary_reads)",
    )
    ap.add_argument(
        "--adv-steps", default="1", help="adversary updates per main update (loss.adv_steps)"
    )
    ap.add_argument(
        "--aligns",
        default="",
        help="loss.align values to sweep (comma-separated; the plot's x axis when more than one)",
    )
    ap.add_argument("--no-conventional", action="store_true")
    ap.add_argument(
        "--models",
        default="adversarial",
        help="adversarial model types to sweep (adversarial, mixedeffects: its FE latent)",
    )
    ap.add_argument(
        "--set", action="append", default=[], help="extra config overrides for every run"
    )
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--n-cells", type=int, default=6000)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--effects", default="varied", choices=["basic", "varied"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adversary_sweep"))
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="one seed, weights 0.1 and 1, 2 epochs")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.weights, a.epochs, a.n_cells = "0", "0.1,1", 2, 2000
    work = Path(a.work or tempfile.mkdtemp(prefix="adv-sweep-"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        data = make_data(work, seed, a.n_cells, a.crop, a.effects)
        conv = [("conventional", "subtract", 0.0, "all", 1, "")]
        jobs = ([] if a.no_conventional else conv) + [
            (mt, o, float(w), rd, int(k), al)
            for mt in a.models.split(",")
            if mt  # --models '': the conventional model alone
            for rd in a.reads.split(",")
            for k in a.adv_steps.split(",")
            for o in a.objectives.split(",")
            for w in a.weights.split(",")
            for al in a.aligns.split(",")
        ]
        for model, objective, w, rd, k, al in jobs:
            extra = tuple(a.set) + ((f"loss.align={al}",) if al else ())
            r = one_run(data, work, model, objective, w, seed, a.epochs, a.crop, rd, k, extra)
            runs.append(r)
            print(
                f"seed {seed} {model:12s} {objective:9s} reads={rd} steps={k} adv={w:<5g} "
                f"{' '.join(a.set)} sd {r['test_latent_sd_mean']:.3g}/{r['test_latent_sd_min']:.3g}"
                f" val_adv_acc {r['val_adv_acc']:.2f} DB "
                f"{r['test_db']:.2f} "
                f"CH {r['test_ch']:.1f} probe {r['test_batch_probe']:.2f} (chance "
                f"{r['test_batch_probe_chance']:.2f}) within label {r['test_probe_within_label']:.2f} "
                f"(chance {r['test_probe_within_label_chance']:.2f}) test AUROC {r['test_auroc']:.3f} unseen "
                f"{r['unseen_auroc']:.3f}",
                flush=True,
            )
            (out / "adversary_sweep.json").write_text(
                json.dumps(
                    {"args": vars(a), "load_avg": os.getloadavg(), "runs": runs},
                    indent=1,
                    default=float,
                )
            )
    plot(runs, out / "adversary_sweep.png", "align" if len(a.aligns.split(",")) > 1 else "adv")
    print(f"-> {out / 'adversary_sweep.json'}, {out / 'adversary_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
