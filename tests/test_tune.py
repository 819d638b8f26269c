"""`raycell tune`: search-space checks before Ray starts, concurrency bounds, and a real 2-trial search."""

import json
import math

import pandas as pd
import pytest
import yaml
from conftest import tiny_overrides

from raycell.config import ConfigError, load_config

SPACE = [
    "tune.space.loss.adv={dist: loguniform, low: 0.01, high: 1.0}",
    "tune.space.train.lr={dist: loguniform, low: 1.0e-4, high: 1.0e-2}",
]


def _cfg(tiny_data, tmp_path, extra=()):
    return load_config(
        None,
        tiny_overrides(tiny_data, tmp_path / "runs", epochs=1)
        + ["model.type=adversarial", f"tune.out={tmp_path / 'search'}", *extra],
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "tune.space.loss.nope={dist: uniform, low: 0, high: 1}",
            "unknown config key 'loss.nope'; valid keys in 'loss': recon, cls, adv",
        ),
        (
            "tune.space.loss.adv={dist: gaussian, low: 0, high: 1}",
            "unknown distribution 'gaussian'",
        ),
        ("tune.num_samples=0", "tune.num_samples must be >= 1, got 0"),
        (
            "tune.space.loss.adv={dist: uniform, low: 0.5, high: 0.5}",
            "low (0.5) must be smaller than high (0.5)",
        ),
        (
            "tune.space.loss.adv={dist: uniform, low: 0.9, high: 0.1}",
            "low (0.9) must be smaller than high (0.1)",
        ),
        (
            "tune.space.loss.adv={dist: loguniform, low: 0, high: 1}",
            "loguniform needs low > 0, got 0",
        ),
        ("tune.space.loss.adv={dist: choice, values: []}", "choice needs a non-empty list"),
        ("tune.space.loss.adv={dist: uniform, low: 0}", "uniform takes high, low, got low"),
        (
            "tune.space.train.epochs={dist: randint, low: 1, high: 4}",
            "'train.epochs' cannot be searched",
        ),
        ("tune.space.model.args={dist: choice, values: [1]}", "tune.space.model.args: choice"),
        ("tune.mode=maximum", "tune.mode must be max or min, got 'maximum'"),
        ("tune.select=last", "tune.select must be budget or best_epoch, got 'last'"),
    ],
)
def test_bad_space_is_one_line_config_error(override, message):
    with pytest.raises(ConfigError) as exc:
        cfg = load_config(None, [override])
        from raycell.tune import check_tune

        check_tune(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_checks_before_ray(tiny_data, tmp_path):
    from raycell.tune import apply_params, check_tune

    with pytest.raises(ConfigError, match="tune.space is empty"):
        check_tune(_cfg(tiny_data, tmp_path))
    # a sampled value the key refuses (range and type), found at the bounds before any trial runs
    with pytest.raises(
        ConfigError, match=r"tune.space.loss.cls: uniform can sample -1.*loss.cls must be >= 0"
    ):
        check_tune(
            _cfg(tiny_data, tmp_path, ["tune.space.loss.cls={dist: uniform, low: -1, high: 1}"])
        )
    with pytest.raises(ConfigError, match="config key 'train.lr' expects a number"):
        check_tune(
            _cfg(tiny_data, tmp_path, ["tune.space.train.lr={dist: choice, values: [fast]}"])
        )
    with pytest.raises(ConfigError, match="model.type: unknown model type 'nope'"):
        check_tune(
            _cfg(
                tiny_data,
                tmp_path,
                ["tune.space.model.type={dist: choice, values: [conventional, nope]}"],
            )
        )
    # nested sections and dotted keys are the same space; dict-valued keys take any sub-key
    cfg = load_config(
        None,
        [
            "tune.space={loss: {adv: {dist: uniform, low: 0, high: 1}}, "
            "model.args.latent_dim: {dist: randint, low: 4, high: 9}}"
        ],
    )
    assert set(cfg.tune.space) == {"loss.adv", "model.args.latent_dim"}
    c = apply_params(cfg, {"loss.adv": 0.25, "model.args.latent_dim": 6, "train.lr": 3e-3})
    assert (c.loss.adv, c.model.args, c.train.lr) == (0.25, {"latent_dim": 6}, 3e-3)
    # an output folder that holds a search or other files is refused
    out = tmp_path / "taken"
    (out / "search").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a search"):
        check_tune(_cfg(tiny_data, tmp_path, [*SPACE, f"tune.out={out}"]))


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            "model.args.nonsense_arg={dist: choice, values: [1, 2]}",
            "tune.space.model.args.nonsense_arg: choice can sample 1, which model type 'adversarial' "
            "rejects when built: model type 'adversarial' does not take argument(s) ['nonsense_arg']",
        ),
        (
            "model.args.latent_dim={dist: choice, values: [8, sixteen, true]}",
            "tune.space.model.args.latent_dim: choice can sample 'sixteen', a str, but model type "
            "'adversarial' takes an int (or None) for latent_dim",
        ),
        (
            "model.args.latent_dim={dist: choice, values: [8, true]}",
            "can sample True, a bool, but model type 'adversarial' takes an int (or None)",
        ),
    ],
)
def test_model_values_are_built_before_ray(
    tiny_data, tmp_path, capsys, monkeypatch, entry, message
):
    """Values only the model builder can judge: refused in one line, before Ray starts."""
    import raycell.utils.ray_utils as ru
    from raycell.__main__ import main

    monkeypatch.setattr(ru, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    args = ["tune", "--model", "adversarial", "--set", f"tune.out={tmp_path / 'search'}"]
    for ov in tiny_overrides(tiny_data, tmp_path / "runs", epochs=1) + [f"tune.space.{entry}"]:
        args += ["--set", ov]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "search").exists()


def test_a_failure_shared_by_the_first_trials_stops_the_search():
    from raycell.tune import _failure_watch

    class Trial:
        def __init__(self, text):
            self.text = text

        def get_error(self):
            return self.text

    trace = "Traceback (most recent call last):\n  File x\nRuntimeError: {}\n"
    watch = _failure_watch(num_samples=6)
    watch.on_trial_error(iteration=1, trials=[], trial=Trial(trace.format("CUDA missing")))
    assert not watch.stop_all()
    watch.on_trial_error(iteration=2, trials=[], trial=Trial(trace.format("CUDA missing")))
    assert watch.stop_all() and watch.reason == "RuntimeError: CUDA missing"
    # once a trial reported a result, failures are the trials' own (a diverging lr, say)
    watch = _failure_watch(num_samples=6)
    watch.on_trial_result(iteration=1, trials=[], trial=Trial(""), result={"val_loss": 1.0})
    for i in range(3):
        watch.on_trial_error(iteration=2 + i, trials=[], trial=Trial(trace.format("nan loss")))
    assert not watch.stop_all()
    # different reasons: nothing shared
    watch = _failure_watch(num_samples=6)
    watch.on_trial_error(iteration=1, trials=[], trial=Trial(trace.format("a")))
    watch.on_trial_error(iteration=2, trials=[], trial=Trial(trace.format("b")))
    assert not watch.stop_all()


def test_cli_error_is_one_line_before_ray(tmp_path, capsys):
    from raycell.__main__ import main

    assert main(["tune", "--set", "tune.space.loss.adv={dist: beta, low: 0, high: 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("raycell: error:")
        and "unknown distribution 'beta'" in err
        and "\n" not in err
    )
    assert main(["tune", "--data", str(tmp_path / "none"), "--set", SPACE[0]]) == 2
    assert "data set folder not found" in capsys.readouterr().err


def test_concurrency_is_bounded_by_the_cluster():
    from raycell.tune import max_concurrent, trial_resources

    cfg = load_config(
        None,
        ["tune.num_samples=8", "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 1}"],
    )
    assert trial_resources(cfg) == {"CPU": 2.01}
    assert max_concurrent(cfg, {"CPU": 16.0}) == (5, 5)  # 16 // (2.01 + 1 for data reads)
    cfg = load_config(
        None,
        ["tune.num_samples=3", "scaling.use_gpu=true", "scaling.resources_per_worker={CPU: 2}"],
    )
    assert trial_resources(cfg) == {"CPU": 2.01, "GPU": 1.0}
    assert max_concurrent(cfg, {"CPU": 64.0, "GPU": 8.0}) == (3, 8)  # num_samples caps it
    cfg.tune.max_concurrent_trials = 2
    assert max_concurrent(cfg, {"CPU": 64.0, "GPU": 8.0}) == (2, 8)
    with pytest.raises(ConfigError, match="one trial needs"):
        max_concurrent(cfg, {"CPU": 64.0})  # no GPU at all


def _row(tid, curve, status):
    """A trials.csv row as `_trial_rows` makes it: scored at the trial's best epoch."""
    best = max(range(len(curve)), key=curve.__getitem__)
    return {
        "trial_id": tid,
        "objective": curve[best],
        "best_epoch": best,
        "epochs_run": len(curve),
        "last_epoch_objective": curve[-1],
        "status": status,
    }


def test_asha_stopped_trials_do_not_outrank_the_survivor():
    """ASHA stopped a and b after 2 epochs (worse than c at that rung); their 2-epoch values happen to be
    higher than anything c reached over 6. The old rule (last epoch, all trials) picked a; under
    'budget' only c ran the full budget, so c is chosen at its best epoch."""
    from raycell.tune import select_best

    rows = [
        _row("a", [0.70, 0.81], "stopped"),
        _row("b", [0.60, 0.79], "stopped"),
        _row("c", [0.72, 0.80, 0.74, 0.78, 0.77, 0.76], "completed"),
        _row("d", [0.99], "error"),
    ]
    best = select_best(rows, "budget", "max")
    assert best["trial_id"] == "c" and best["best_epoch"] == 1 and best["objective"] == 0.80
    assert [r["eligible"] for r in rows] == [False, False, True, False]
    # 'best_epoch': every trial that did not fail competes at its best epoch
    best = select_best(rows, "best_epoch", "max")
    assert best["trial_id"] == "a" and [r["eligible"] for r in rows] == [True, True, True, False]
    # 'min' objectives (a loss), and nothing eligible at all
    rows = [_row("a", [0.5, 0.4], "stopped"), _row("c", [0.6, 0.45, 0.5], "completed")]
    for r in rows:
        r["objective"] = min(r["objective"], 0.45 if r["trial_id"] == "c" else 0.4)
    assert select_best(rows, "budget", "min")["trial_id"] == "c"
    assert select_best(rows, "best_epoch", "min")["trial_id"] == "a"
    assert select_best([_row("x", [0.9], "error")], "budget", "max") is None


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_search_writes_agreeing_outputs(tiny_data, ray_local, tmp_path):
    from raycell.formats.checkpoint import find_checkpoint, read_meta
    from raycell.pipeline import run_tune

    cfg = _cfg(
        tiny_data,
        tmp_path,
        [
            *SPACE,
            "tune.num_samples=2",
            "tune.max_concurrent_trials=1",
            "train.epochs=2",
            "tune.grace_period=2",
            "train.checkpoints_to_keep=1",
        ],
    )
    res = run_tune(cfg)
    out = tmp_path / "search"
    trials = pd.read_csv(out / "trials.csv")
    assert (
        len(trials) == 2
        and set(trials["status"]) == {"completed"}
        and list(trials["epochs_run"]) == [2, 2]
    )
    assert {"trial_id", "loss.adv", "train.lr", "objective", "epochs_run", "status"} <= set(
        trials.columns
    )
    assert (
        trials["loss.adv"].between(0.01, 1.0).all() and trials["train.lr"].between(1e-4, 1e-2).all()
    )
    assert trials["loss.adv"].nunique() == 2  # two different samples
    # each trial is a Train run named after its trial id, with its sampled values in its config.yaml
    for _, row in trials.iterrows():
        rec = yaml.safe_load(
            (out / "trials" / f"train-{row['trial_id']}" / "config.yaml").read_text()
        )
        assert math.isclose(rec["loss"]["adv"], row["loss.adv"], rel_tol=1e-9)
    best_row = trials.loc[trials["objective"].idxmax()]
    assert res["best"]["trial_id"] == best_row["trial_id"]
    best = load_config(
        out / "best.yaml"
    )  # a ready-to-use config: `raycell train --config best.yaml`
    assert math.isclose(best.loss.adv, best_row["loss.adv"], rel_tol=1e-9)
    assert math.isclose(best.train.lr, best_row["train.lr"], rel_tol=1e-9)
    # best.yaml trains up to the chosen epoch; <search>/best is that epoch's checkpoint, kept although
    # only one checkpoint (besides the latest) is kept per trial
    assert best.model.type == "adversarial" and best.train.epochs == best_row["best_epoch"] + 1
    assert best.data.path == str(tiny_data)
    assert f"{best_row['objective']:.4f}" in (out / "best.yaml").read_text().splitlines()[0]
    history = [
        json.loads(x)
        for x in (out / "trials" / f"train-{best_row['trial_id']}" / "history.jsonl")
        .read_text()
        .splitlines()
    ]
    assert best_row["objective"] == max(h["val_auroc"] for h in history)
    meta = read_meta(find_checkpoint(out / "best"))
    assert meta.epoch == best_row["best_epoch"]
    assert f"train-{best_row['trial_id']}" in str((out / "best").resolve())
    png = (out / "tune_objective.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.ray
def test_metric_never_reported_is_a_clear_error(tiny_data, ray_local, tmp_path):
    from raycell.pipeline import run_tune

    cfg = _cfg(
        tiny_data,
        tmp_path,
        [
            SPACE[0],
            "tune.num_samples=1",
            "tune.max_concurrent_trials=1",
            "tune.metric=val_auroc_typo",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"tune.metric 'val_auroc_typo' was never reported.*val_auroc"
    ) as exc:
        run_tune(cfg)
    assert "\n" not in str(exc.value)


def test_resume_needs_a_search_folder_and_keeps_its_config(tiny_data, tmp_path, capsys):
    from raycell.__main__ import main
    from raycell.config import save_config
    from raycell.tune import resume_search_config

    assert main(["tune", "--resume", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tune.resume: search folder not found" in err and "\n" not in err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    assert main(["tune", "--resume", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no raycell search" in err and "\n" not in err
    # a folder that looks like a search: a different searched space or model is refused, ray.* may change
    out = tmp_path / "search"
    (out / "search").mkdir(parents=True)
    (out / "search" / "experiment_state-2026-11-30_00-00-00.json").write_text("{}")
    rec = _cfg(tiny_data, tmp_path, [*SPACE, f"tune.out={out}"])
    save_config(rec, out / "config.yaml")
    assert main(["tune", "--resume", str(out), "--model", "conventional"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "model.type ('adversarial' in the search, 'conventional' given)" in err and "\n" not in err
    )
    cfg = load_config(None, [f"tune.resume={out}", "ray.num_cpus=3"])
    got = resume_search_config(cfg, ["tune.resume", "ray.num_cpus"])
    assert (
        got.model.type == "adversarial"
        and got.tune.space == rec.tune.space
        and got.ray.num_cpus == 3
    )
    assert got.tune.out == str(out)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(tiny_data, ray_local, tmp_path):
    """SIGKILL a running search after its first trial finished; `--resume` completes the table."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from raycell.__main__ import run

    out = tmp_path / "search"
    args = [
        "tune",
        "--data",
        str(tiny_data),
        "--model",
        "adversarial",
        "--samples",
        "3",
        "--concurrent",
        "1",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--set",
        SPACE[0],
        "--set",
        SPACE[1],
    ]
    args += [
        x for ov in tiny_overrides(tiny_data, tmp_path / "runs", epochs=1) for x in ("--set", ov)
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycell", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = None
    try:
        # a poll, not a time budget: on a busy machine Ray's start and a trial take what they take
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and proc.poll() is None:
            runs = (
                sorted((out / "trials").glob("train-*"), key=lambda p: p.stat().st_mtime)
                if (out / "trials").is_dir()
                else []
            )
            done = [r for r in runs if (r / "history.jsonl").is_file()]
            if done and len(runs) >= 2:  # one at a time: trial 2 started, so trial 1 finished
                first = done[0]
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first is not None, (
        f"no first trial finished while the search ran (exit status {proc.returncode}: -9 is the "
        "kill after 30 min)"
    )
    assert not (out / "trials.csv").exists()  # it really was interrupted
    before = (first / "history.jsonl").read_text()

    res = run(["tune", "--resume", str(out)])
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and trials["trial_id"].is_unique and (trials["epochs_run"] == 1).all()
    assert (
        f"train-{trials['trial_id'].iloc[0]}" == first.name
    )  # the finished trial is kept, not re-run
    assert (first / "history.jsonl").read_text() == before
    assert res["best"] is not None and (out / "best.yaml").is_file()


def test_fold_filters_move_only_the_held_batch_train_and_val_cells():
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.data.expressions  # noqa: F401  (the expressions parse as Ray Data parses them)

    from raycell.data.dataset import split_filter

    rows = pa.table(
        {
            "split": ["train", "val", "test", "unseen", "train", "val", "test"],
            "batch": ["b1", "b1", "b1", "b9", "b2", "b2", "b2"],
        }
    )
    assert split_filter("train") == "split == 'train'"

    def pick(expr):
        ok = [
            eval(
                expr, {}, {"split": s, "batch": b}
            )  # the expression is Python syntax, as Ray's parser
            for s, b in zip(rows["split"].to_pylist(), rows["batch"].to_pylist())
        ]
        return [
            f"{s}/{b}"
            for s, b, k in zip(rows["split"].to_pylist(), rows["batch"].to_pylist(), ok)
            if k
        ]

    assert pick(split_filter("train", ["b1"])) == ["train/b2"]
    assert pick(split_filter("val", ["b1"])) == ["val/b2"]
    assert pick(split_filter("valbatch", ["b1"])) == ["train/b1", "val/b1"]
    assert pick(split_filter("test", ["b1"])) == ["test/b1", "test/b2"]  # test cells never move
    assert pc.sum(pc.equal(rows["split"], "unseen")).as_py() == 1


def test_fold_metrics_average_the_folds_and_keep_each():
    from raycell.tune import fold_metrics

    res = fold_metrics(
        [
            {"epoch": 3, "valbatch_auroc": 0.6, "val_loss": 1.0, "only_one": 5},
            {"epoch": 3, "valbatch_auroc": 0.8, "val_loss": 3.0},
        ],
        "valbatch_auroc",
    )
    assert res["epoch"] == 3 and math.isclose(res["valbatch_auroc"], 0.7) and res["val_loss"] == 2.0
    assert math.isclose(res["valbatch_auroc_fold_sd"], 0.1) and res["valbatch_auroc_fold1"] == 0.8
    assert "only_one" not in res


def test_trials_csv_rows_carry_the_spread_over_folds_at_the_best_epoch():
    from types import SimpleNamespace

    from raycell.tune import _trial_rows

    def result(num, hist):
        return SimpleNamespace(
            metrics_dataframe=pd.DataFrame(hist),
            path=f"/s/_trial_abc{num}_0000{num}_x",
            metrics={"trial_id": f"abc{num}"},
            config={"loss.adv": 0.1 * (num + 1)},
            error=None,
        )

    folded = [
        {"epoch": 0, "valbatch_auroc": 0.6, "valbatch_auroc_fold_sd": 0.1}
        | {"valbatch_auroc_fold0": 0.5, "valbatch_auroc_fold1": 0.7},
        {"epoch": 1, "valbatch_auroc": 0.7, "valbatch_auroc_fold_sd": 0.05}
        | {"valbatch_auroc_fold0": 0.65, "valbatch_auroc_fold1": 0.75},
    ]
    rows, _ = _trial_rows([result(0, folded)], ["loss.adv"], "valbatch_auroc", "max", 2)
    r = rows[0]
    assert r["best_epoch"] == 1 and r["objective"] == 0.7  # the mean over the folds
    assert r["objective_fold_sd"] == 0.05 and (r["objective_fold0"], r["objective_fold1"]) == (
        0.65,
        0.75,
    )
    # without folds: no spread columns
    rows, _ = _trial_rows(
        [result(1, [{"epoch": 0, "val_auroc": 0.6}])], ["loss.adv"], "val_auroc", "max", 1
    )
    assert not any(k.startswith("objective_fold") for k in rows[0])


def test_a_local_ray_gets_the_logical_cpus_three_folds_need(monkeypatch):
    """K=3 folds of 0.5-CPU workers need 1.5 + 0.01 + 3 (reads) logical CPUs: more than a 2-core
    machine's default 4, so a private local Ray is started with 5; a joined cluster is left alone."""
    from raycell.tune import local_ray_cpus, max_concurrent

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, ["scaling.resources_per_worker={CPU: 0.5}", "tune.folds=3"])
    with pytest.raises(ConfigError, match="one trial needs"):
        max_concurrent(cfg, {"CPU": 4.0})
    n = local_ray_cpus(cfg, 3)
    assert n == 5 and max_concurrent(cfg, {"CPU": float(n)}) == (1, 1)
    assert local_ray_cpus(cfg, 2) == 0  # 3.01 fits the default 4
    assert local_ray_cpus(cfg, 0) == 0
    cfg.ray.address = "auto"
    assert local_ray_cpus(cfg, 3) == 0  # a cluster's CPUs are its own
    cfg.ray.address, cfg.ray.num_cpus = "", 12
    assert local_ray_cpus(cfg, 3) == 12  # a configured count is kept


def test_folds_need_enough_batches_and_a_model_without_a_batch_head(tiny_data, tmp_path):
    from raycell.formats.shards import open_dataset
    from raycell.tune import cross_batch_folds

    ds = open_dataset(tiny_data)
    cfg = _cfg(tiny_data, tmp_path, ["tune.folds=3"])
    folds = cross_batch_folds(cfg, ds)
    assert len(folds) == 3 and len({f[0] for f in folds}) == 3
    assert cross_batch_folds(cfg, ds) == folds  # drawn by the seed: the same every time
    with pytest.raises(ConfigError, match="tune.folds=40 needs at least 41 training batches"):
        cross_batch_folds(_cfg(tiny_data, tmp_path, ["tune.folds=40"]), ds)


@pytest.mark.ray
@pytest.mark.slow
def test_a_fold_search_reports_the_mean_over_folds(tiny_data, ray_local, tmp_path):
    from raycell.pipeline import run_tune

    cfg = _cfg(
        tiny_data,
        tmp_path,
        [
            *SPACE,
            "tune.num_samples=1",
            "tune.folds=2",
            "tune.metric=valbatch_auroc",
            "data.materialize=never",
        ],
    )
    res = run_tune(cfg)
    out = tmp_path / "search"
    trial = out / "trials" / f"train-{res['best']['trial_id']}"
    folds = [
        [json.loads(x) for x in (trial / f"fold-{k}" / "history.jsonl").read_text().splitlines()]
        for k in range(2)
    ]
    merged = [json.loads(x) for x in (trial / "history.jsonl").read_text().splitlines()]
    assert len(merged) == 1 and all(len(f) == 1 for f in folds)
    per_fold = [f[0]["valbatch_auroc"] for f in folds]
    assert math.isclose(merged[0]["valbatch_auroc"], sum(per_fold) / 2)
    assert math.isclose(res["best"]["objective"], merged[0]["valbatch_auroc"])
    # each fold trained without its held-out batch: the batch is not a column of its design matrix
    from raycell.formats.checkpoint import find_checkpoint, read_meta
    from raycell.formats.shards import open_dataset
    from raycell.tune import cross_batch_folds

    held = cross_batch_folds(cfg, open_dataset(tiny_data))
    for k in range(2):
        z_columns = list(read_meta(find_checkpoint(trial / f"fold-{k}")).batches.values)
        assert held[k][0] not in z_columns and held[1 - k][0] in z_columns
    assert "none: each of its fold models misses a batch" in (out / "best.yaml").read_text()


def test_trials_csv_error_is_one_plain_line():
    from raycell.tune import _first_line

    err = RuntimeError("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1) failed\nTraceback ...")
    assert _first_line(err) == "ray::ImplicitFunc.train() (pid=1) failed"
    assert _first_line(None) == ""
