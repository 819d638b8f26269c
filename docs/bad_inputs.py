"""Regenerate `docs/bad_inputs.md`: what a user sees for each kind of bad input, and the exit code.

Each case builds its bad input in a scratch folder, runs one `raycell` command in this process
(`raycell.__main__.main`, exactly what the console script runs), and records the exit status, the last
line written to stderr, how many lines stderr held, whether Ray was started, the seconds taken, and,
where the case is about data loss, whether the user's files survived. `--check` exits 1 when a case
does not behave as promised (status other than `expect`, a traceback, more than one error line, or
lost files, Ray started by a case that needs none, a case missing from the table);
`tests/test_bad_inputs.py` runs the cases that need no Ray that way, in a subprocess.

    .venv/bin/python docs/bad_inputs.py                # all cases (starts Ray for a few), writes the table
    .venv/bin/python docs/bad_inputs.py --no-ray --check   # the fast cases, no file written
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One bad input: `setup(fx)` returns the argv; `check(fx)` returns '' or what went wrong with
    the data.
    """

    area: str
    what: str
    setup: Callable[["Fixtures"], list[str]]
    expect: int = 2
    ray: bool = (
        False  # needs a trained run or predictions (made with Ray) to set up, or runs to completion
    )
    check: Callable[["Fixtures"], str] | None = None
    result: dict = field(default_factory=dict)
    during: Callable[["Fixtures"], contextlib.AbstractContextManager] | None = (
        None  # a fault, injected
    )
    section: str = ""  # a heading of SECTIONS, or "" for the main table


LOST = "## Outputs a user must never lose, and results that must never be silently wrong"
MACHINE = "## When the machine is the problem"


def _profile(
    fx: "Fixtures", *args: str, nan: bool = False, constant: bool = False, out: Path | None = None
) -> list[str]:
    """`raycell profile` on a small well table (2 treatments, DMSO controls), made bad on demand."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": [f"W{i:02d}" for i in range(12)],
            "Metadata_treatment": ["DMSO"] * 4 + ["A"] * 4 + ["B"] * 4,
            "Cells_a": rng.normal(size=12),
            "Cells_b": rng.normal(size=12),
        }
    )
    if nan:
        df.loc[5, "Cells_b"] = np.nan
    if constant:
        df[["Cells_a", "Cells_b"]] = 1.0
    f = fx.path("wells.csv")
    df.to_csv(f, index=False)
    return [
        "profile",
        "--input",
        str(f),
        "--out",
        str(out or fx.root / "profile_out"),
        "--treatment",
        "Metadata_treatment",
        *args,
    ]


class Fixtures:
    """Scratch inputs built on demand and shared by the cases."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict = {}

    def path(self, name: str) -> Path:
        """A fresh scratch path (not created)."""
        p = self.root / name
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return p

    def user_folder(self, name: str) -> Path:
        """A folder of 'the user's' files that no raycell command may delete."""
        p = self.path(name)
        p.mkdir(parents=True)
        (p / "notes.txt").write_text("my notes\n")
        (p / "plate1").mkdir()
        (p / "plate1" / "image.tif").write_bytes(b"not really a tiff")
        return p

    @staticmethod
    def intact(p: Path) -> str:
        """'' when the user folder made by `user_folder` is as it was."""
        ok = (p / "notes.txt").is_file() and (p / "plate1" / "image.tif").is_file()
        return "" if ok else f"user files in {p.name} were lost"

    def data(self) -> Path:
        """A tiny split synthetic data set (32 px, 240 cells)."""
        if "data" not in self._cache:
            from raycell.data.splits import split_dataset
            from raycell.data.synthetic import write_synthetic

            out = self.root / "fixture_data"
            write_synthetic(str(out), n_cells=240, crop_size=32, rows_per_shard=60, seed=0)
            split_dataset(str(out))
            self._cache["data"] = out
        return self._cache["data"]

    def copy(self, src: Path, name: str) -> Path:
        """A private copy of a fixture folder (`self.data()`, `self.checkpoint()`), to break."""
        dst = self.path(name)
        shutil.copytree(src, dst)
        return dst

    def checkpoint(self) -> Path:
        """A run folder with an (untrained) tiny conventional AEC checkpoint, written without Ray."""
        if "ck" not in self._cache:
            from raycell import constants as K
            from raycell.config import load_config
            from raycell.formats.categories import CategoryMap
            from raycell.formats.shards import open_dataset
            from raycell.formats.spec import DataSpec
            from raycell.models import create_model
            from raycell.models.checkpoint import save_checkpoint

            ds = open_dataset(self.data())
            run = self.root / "fixture_run"
            cfg = load_config(None, [f"data.path={ds.root}", "model.preset=tiny"])
            model = create_model(
                "conventional",
                preset="tiny",
                in_channels=ds.shape[0],
                image_size=ds.shape[1],
                n_classes=len(ds.manifest.label_vocab),
            )
            batches = ds.read_table([K.BATCH], splits=[K.TRAIN]).column(K.BATCH).to_pylist()
            save_checkpoint(
                run / "checkpoint_000000",
                model,
                None,
                epoch=0,
                spec=DataSpec.from_dataset(ds),
                labels=CategoryMap(K.LABEL, ds.manifest.label_vocab),
                batches=CategoryMap.fit(K.BATCH, batches),
                config=cfg.to_dict(),
                metrics={},
            )
            self._cache["ck"] = run
        return self._cache["ck"]

    def raw(self) -> Path:
        """Small synthetic raw fields of view with a plate map (`synth --raw`)."""
        if "raw" not in self._cache:
            from raycell.data.synthetic_raw import write_synthetic_raw

            out = self.root / "fixture_raw"
            write_synthetic_raw(
                out,
                effects="basic",
                seed=1,
                n_batches=1,
                n_lines=2,
                wells=2,
                fields=1,
                fov_size=96,
                cells_per_fov=4,
            )
            self._cache["raw"] = out
        return self._cache["raw"]

    def ingest_args(self, raw: Path, out: Path) -> list[str]:
        """`raycell ingest` argv for a `synth --raw` folder."""
        desc = json.loads((raw / "raw.json").read_text())["ingest"]
        return [
            "ingest",
            "--input",
            str(raw / desc["input"]),
            "--out",
            str(out),
            "--pattern",
            desc["pattern"],
            "--platemap",
            str(raw / desc["platemap"]),
            *_set(
                "ray.progress=false",
                "ingest.crop_size=32",
                f"ingest.channels={json.dumps(desc['channels'])}",
                f"ingest.nucleus_channel={desc['nucleus_channel']}",
                f"ingest.cytoplasm_channel={desc['cytoplasm_channel']}",
                f"ingest.label_column={desc['label_column']}",
                f"ingest.group_column={desc['group_column']}",
            ),
        ]

    def armed(self) -> Path:
        """A folder of ARMED-style data_{train,val,test,unseen}.npz + .csv files."""
        src = self.path("armed_src")
        src.mkdir()
        rng = np.random.default_rng(0)
        for split, n, dates in [
            ("train", 20, ["d1", "d2"]),
            ("val", 6, ["d1", "d2"]),
            ("test", 6, ["d1", "d2"]),
            ("unseen", 6, ["d3"]),
        ]:
            date = rng.choice(dates, n)
            cluster = np.zeros((n, 2), np.float32)
            if split != "unseen":
                cluster[np.arange(n), [["d1", "d2"].index(d) for d in date]] = 1
            eff = rng.choice(["high", "low"], n)
            np.savez(
                src / f"data_{split}.npz",
                images=rng.random((n, 16, 16, 1)).astype(np.float32),
                label=(eff == "low").astype(np.float32),
                cluster=cluster,
            )
            pd.DataFrame(
                {
                    "image": [f"png/{i}.png" for i in range(n)],
                    "date": date,
                    "celltype": "m1",
                    "met-eff": eff,
                    "cell": "c",
                }
            ).to_csv(src / f"data_{split}.csv")
        return src


# --------------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------------


def _set(*kv: str) -> list[str]:
    return [a for k in kv for a in ("--set", k)]


def _train(fx: Fixtures, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(fx.data()),
        "--runs-dir",
        str(fx.root / "runs"),
        "--preset",
        "tiny",
        *_set("ray.progress=false"),
        *extra,
    ]


def _infer(
    fx: Fixtures, *extra: str, ck: Path | None = None, data: Path | None = None
) -> list[str]:
    return [
        "infer",
        "--checkpoint",
        str(ck or fx.checkpoint()),
        "--data",
        str(data or fx.data()),
        "--out",
        str(fx.path("pred_out")),
        *_set("ray.progress=false"),
        *extra,
    ]


def _truncate(p: Path, keep: float = 0.5) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: int(len(b) * keep)])


def _dup_ids(fx: Fixtures) -> list[str]:
    import pyarrow.parquet as pq

    d = fx.copy(fx.data(), "dup_ids")
    shards = sorted((d / "shards").glob("part-*.parquet"))
    t0, t1 = pq.read_table(shards[0]), pq.read_table(shards[1])
    pq.write_table(
        t1.set_column(t1.schema.get_field_index("cell_id"), "cell_id", t0.column("cell_id")),
        shards[1],
    )
    return ["split", "--data", str(d)]


def _corrupt_model(fx: Fixtures) -> list[str]:
    run = fx.copy(fx.checkpoint(), "ck_corrupt")
    _truncate(next(run.glob("checkpoint_*/model.pt")))
    return _infer(fx, ck=run)


def _bad_meta(fx: Fixtures) -> list[str]:
    run = fx.copy(fx.checkpoint(), "ck_badmeta")
    next(run.glob("checkpoint_*/meta.json")).write_text("{ not json")
    return _infer(fx, ck=run)


def _other_crop_size(fx: Fixtures) -> list[str]:
    from raycell.data.splits import split_dataset
    from raycell.data.synthetic import write_synthetic

    d = fx.path("data48")
    write_synthetic(str(d), n_cells=120, crop_size=48, rows_per_shard=60, seed=1)
    split_dataset(str(d))
    return _infer(fx, data=d)


def _truncated_shard(fx: Fixtures) -> list[str]:
    d = fx.copy(fx.data(), "trunc_shard")
    _truncate(sorted((d / "shards").glob("part-*.parquet"))[1])
    return _infer(fx, data=d)


def _bad_image_bytes(fx: Fixtures) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = fx.copy(fx.data(), "bad_bytes")
    shard = sorted((d / "shards").glob("part-*.parquet"))[0]
    t = pq.read_table(shard)
    imgs = t.column("image").to_pylist()
    imgs[3] = imgs[3][:-10]
    pq.write_table(
        t.set_column(t.schema.get_field_index("image"), "image", pa.array(imgs, pa.binary())), shard
    )
    return _infer(fx, data=d)


def _z_not_table(fx: Fixtures) -> list[str]:
    """A folder whose inferred_z.parquet is some other table (a crop shard)."""
    z = fx.path("z_not_table")
    z.mkdir()
    shutil.copy(sorted((fx.data() / "shards").glob("part-*.parquet"))[0], z / "inferred_z.parquet")
    return _infer(fx, "--set", f"infer.z_source={z}")


def _z_not_parquet(fx: Fixtures) -> list[str]:
    z = fx.path("z_not_parquet")
    z.mkdir()
    (z / "inferred_z.parquet").write_text("cell_id,z\n")
    return _infer(fx, "--set", f"infer.z_source={z}")


def _unseen_all(fx: Fixtures) -> list[str]:
    from raycell.formats.shards import open_dataset

    d = fx.copy(fx.data(), "unseen_all")
    vocab = open_dataset(d).manifest.batch_vocab
    return ["split", "--data", str(d), "--unseen", ",".join(vocab)]


def _conflicting_resume(fx: Fixtures) -> list[str]:
    run = fx.copy(fx.checkpoint(), "resume_run")
    from raycell.config import load_config, save_config

    save_config(
        load_config(None, [f"data.path={fx.data()}", "model.type=conventional"]),
        run / "config.yaml",
    )
    fx._cache["resume_cfg"] = (run / "config.yaml").read_bytes()
    return ["train", "--resume", str(run), "--model", "mixedeffects"]


def _resume_corrupt(fx: Fixtures) -> list[str]:
    from raycell.config import load_config, save_config

    run = fx.copy(fx.checkpoint(), "resume_corrupt")
    save_config(
        load_config(
            None, [f"data.path={fx.data()}", "model.type=conventional", "model.preset=tiny"]
        ),
        run / "config.yaml",
    )
    _truncate(next(run.glob("checkpoint_*/model.pt")))
    return ["train", "--resume", str(run)]


def _resume_record_kept(fx: Fixtures) -> str:
    p = fx.root / "resume_run" / "config.yaml"
    return (
        "" if p.read_bytes() == fx._cache["resume_cfg"] else "the run's config.yaml was rewritten"
    )


def _out_is_input(fx: Fixtures) -> list[str]:
    raw = fx.path("raw_in_place")
    shutil.copytree(fx.raw(), raw)
    fx._cache["n_in_place"] = sum(1 for _ in raw.rglob("*") if _.is_file())
    return fx.ingest_args(raw, raw / "images")


def _in_place_intact(fx: Fixtures) -> str:
    n = sum(1 for _ in (fx.root / "raw_in_place").rglob("*") if _.is_file())
    return (
        ""
        if n == fx._cache["n_in_place"]
        else f"input files: {fx._cache['n_in_place']} before, {n} after"
    )


def _armed_in_place(fx: Fixtures) -> list[str]:
    src = fx.armed()
    return ["import-armed", str(src), "--out", str(src)]


def _armed_intact(fx: Fixtures) -> str:
    src = fx.root / "armed_src"
    return (
        ""
        if (src / "data_train.npz").is_file() and (src / "data_train.csv").is_file()
        else "source files lost"
    )


def _out_file(fx: Fixtures) -> list[str]:
    f = fx.path("out_is_file.txt")
    f.write_text("precious\n")
    return fx.ingest_args(fx.raw(), f)


def _file_intact(fx: Fixtures) -> str:
    f = fx.root / "out_is_file.txt"
    return "" if f.is_file() and f.read_text() == "precious\n" else "the file was replaced"


def _uf(name: str) -> Callable[[Fixtures], str]:
    return lambda fx: Fixtures.intact(fx.root / name)


def _eval_after(fx: Fixtures, breaker: Callable[[Path], None]) -> list[str]:
    pred = fx.path("pred_broken")
    shutil.copytree(fx.predictions(), pred)
    breaker(pred)
    return ["evaluate", "--predictions", str(pred), "--out", str(fx.path("eval_out"))]


def _drop_shard(pred: Path) -> None:
    sorted((pred / "shards").glob("part-*.parquet"))[1].unlink()


def _dup_pred(pred: Path) -> None:
    shards = sorted((pred / "shards").glob("part-*.parquet"))
    shutil.copy(shards[0], pred / "shards" / "part-09999.parquet")


def _dup_rows(pred: Path) -> None:
    """Every row of one shard twice (the same cell ids), as a bad merge would leave them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = sorted((pred / "shards").glob("part-*.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(pa.concat_tables([t, t]), f)


def _trunc_pred(pred: Path) -> None:
    _truncate(sorted((pred / "shards").glob("part-*.parquet"))[0])


def _tune_resume_plain(fx: Fixtures) -> list[str]:
    d = fx.path("plain_folder")
    d.mkdir(exist_ok=True)
    (d / "notes.txt").write_text("not a search")
    return ["tune", "--resume", str(d)]


def _misspelt_cluster(fx: Fixtures) -> Path:
    text = (ROOT / "cluster.yaml").read_text().replace("max_workers: 8", "max_worker: 8", 1)
    return _write(fx, "cluster.yaml", text)


def _rayjob_no_entry(fx: Fixtures) -> Path:
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()))
    for d in docs:
        if d and d.get("kind") == "RayJob":
            d["spec"].pop("entrypoint", None)
    return _write(fx, "rayjob.yaml", yaml.safe_dump_all(docs, sort_keys=False))


CASES = [
    # -- outputs: never delete what raycell did not write
    Case(
        "outputs",
        "`ingest --out` a folder of the user's files",
        lambda fx: fx.ingest_args(fx.raw(), fx.user_folder("uf_ingest")),
        check=_uf("uf_ingest"),
    ),
    Case(
        "outputs",
        "`ingest --out` a folder of the user's files, with `--overwrite`",
        lambda fx: fx.ingest_args(fx.raw(), fx.user_folder("uf_ingest2")) + ["--overwrite"],
        check=_uf("uf_ingest2"),
    ),
    Case("outputs", "`ingest --out` the input folder", _out_is_input, check=_in_place_intact),
    Case("outputs", "`ingest --out` a regular file", _out_file, check=_file_intact),
    Case("outputs", "`import-armed SRC --out SRC`", _armed_in_place, check=_armed_intact),
    Case(
        "outputs",
        "`import-armed --out` a folder of the user's files",
        lambda fx: ["import-armed", str(fx.armed()), "--out", str(fx.user_folder("uf_armed"))],
        check=_uf("uf_armed"),
    ),
    Case(
        "outputs",
        "`synth --raw --out` an existing folder",
        lambda fx: ["synth", "--raw", "--out", str(fx.user_folder("uf_raw"))],
        check=_uf("uf_raw"),
    ),
    Case(
        "outputs",
        "`synth --out` a folder of the user's files, with `--overwrite`",
        lambda fx: ["synth", "--out", str(fx.user_folder("uf_synth")), "--overwrite"],
        check=_uf("uf_synth"),
    ),
    # -- config
    Case("config", "unknown key in `--set`", lambda fx: ["config", "--set", "train.epoch=3"]),
    Case("config", "wrong type in `--set`", lambda fx: ["config", "--set", "train.epochs=many"]),
    Case("config", "`train.lr=0`", lambda fx: ["config", "--set", "train.lr=0"]),
    Case(
        "config",
        "config file that does not exist",
        lambda fx: ["config", "--config", str(fx.root / "nope.yaml")],
    ),
    Case(
        "config",
        "config file that is not YAML",
        lambda fx: ["config", "--config", str(_write(fx, "bad.yaml", "a: [1,"))],
    ),
    # -- split
    Case("split", "every batch held out as unseen", _unseen_all),
    Case("split", "duplicate cell ids", _dup_ids),
    Case(
        "split",
        "data set folder that does not exist",
        lambda fx: ["split", "--data", str(fx.root / "nowhere")],
    ),
    # -- train
    Case("train", "unknown model type", lambda fx: _train(fx, "--model", "convnext9000")),
    Case("train", "data set without splits", lambda fx: _train_unsplit(fx)),
    Case(
        "train",
        "`--resume` a run folder that does not exist",
        lambda fx: ["train", "--resume", str(fx.root / "no_run")],
    ),
    Case(
        "train",
        "`--resume` with a different `--model`",
        _conflicting_resume,
        check=_resume_record_kept,
    ),
    Case("train", "`--resume` a run whose latest `model.pt` is truncated", _resume_corrupt),
    Case(
        "train",
        "timm backbone name that does not exist",
        lambda fx: _train(fx, "--model", "timm", "--set", "model.args={backbone: resnet5O}"),
    ),
    Case(
        "train",
        "weak-label column (`data.heads`) missing from the data",
        lambda fx: _train(fx, "--model", "timm", "--set", "data.heads=[dose]"),
    ),
    Case(
        "train",
        "`model.args.weights` a file that is not a state dict",
        lambda fx: _train(
            fx,
            "--model",
            "timm",
            "--set",
            f"model.args={{backbone: resnet18, weights: {_write(fx, 'w.pth', 'junk')}}}",
        ),
    ),
    # -- embed, export, report
    Case(
        "embed",
        "checkpoint folder that does not exist",
        lambda fx: ["embed", "--checkpoint", str(fx.root / "no_ck"), "--data", str(fx.data())],
    ),
    Case(
        "export",
        "embeddings folder without embeddings.json",
        lambda fx: [
            "export",
            "--embeddings",
            str(fx.user_folder("uf_emb")),
            "--out",
            str(fx.root / "x.h5ad"),
        ],
        check=_uf("uf_emb"),
    ),
    Case("export", "`export.format=xlsx`", lambda fx: ["export", "--set", "export.format=xlsx"]),
    Case(
        "profile",
        "`profile.controls` naming a column the profiles lack",
        lambda fx: _profile(fx, "--controls", "Metadata_compound == 'DMSO'"),
    ),
    Case(
        "profile",
        "`profile.controls` matching no well",
        lambda fx: _profile(fx, "--controls", "Metadata_treatment == 'PBS'"),
    ),
    Case(
        "profile",
        "a feature with NaN values",
        lambda fx: _profile(fx, "--controls", "Metadata_treatment == 'DMSO'", nan=True),
    ),
    Case(
        "profile",
        "every feature constant",
        lambda fx: _profile(fx, "--controls", "Metadata_treatment == 'DMSO'", constant=True),
    ),
    Case(
        "profile",
        "`--out` a folder of the user's files",
        lambda fx: _profile(
            fx, "--controls", "Metadata_treatment == 'DMSO'", out=fx.user_folder("uf_profile")
        ),
        check=_uf("uf_profile"),
    ),
    Case(
        "report",
        "a folder with nothing to report",
        lambda fx: ["report", str(fx.user_folder("uf_report"))],
        check=_uf("uf_report"),
    ),
    # -- infer
    Case(
        "infer",
        "checkpoint folder that does not exist",
        lambda fx: _infer(fx, ck=fx.root / "no_ck"),
    ),
    Case("infer", "truncated `model.pt`", _corrupt_model),
    Case("infer", "corrupt `meta.json`", _bad_meta),
    Case("infer", "misspelt `--splits`", lambda fx: _infer(fx, "--splits", "tset")),
    Case(
        "infer",
        "`infer.z_source` that does not exist",
        lambda fx: _infer(fx, "--set", f"infer.z_source={fx.root / 'no_z'}"),
    ),
    Case("infer", "`infer.z_source` whose table is not a Z table", _z_not_table),
    Case("infer", "`infer.z_source` whose file is not parquet", _z_not_parquet),
    Case("infer", "data crop size differs from the model's", _other_crop_size),
    Case("infer", "truncated crop shard", _truncated_shard),
    Case("infer", "a row whose image bytes disagree with the manifest", _bad_image_bytes, ray=True),
    # -- evaluate
    Case(
        "evaluate",
        "predictions folder that does not exist",
        lambda fx: ["evaluate", "--predictions", str(fx.root / "no_pred")],
    ),
    Case(
        "evaluate", "a prediction shard deleted", lambda fx: _eval_after(fx, _drop_shard), ray=True
    ),
    Case(
        "evaluate",
        "a prediction shard copied under another name",
        lambda fx: _eval_after(fx, _dup_pred),
        ray=True,
    ),
    Case(
        "evaluate",
        "duplicated prediction rows (same cell ids twice)",
        lambda fx: _eval_after(fx, _dup_rows),
        ray=True,
    ),
    Case(
        "evaluate", "truncated prediction shard", lambda fx: _eval_after(fx, _trunc_pred), ray=True
    ),
    # -- experiment, Ray
    Case(
        "experiment",
        "`experiment medl --seeds a,b`",
        lambda fx: ["experiment", "medl", "--seeds", "a,b"],
    ),
    Case(
        "ray",
        "`--address` where nothing listens",
        lambda fx: _train(fx, "--address", "127.0.0.1:1"),
    ),
    # -- tune, cluster configs, jobs
    Case(
        "tune",
        "search-space key that does not exist",
        lambda fx: ["tune", "--set", "tune.space.loss.advv={dist: uniform, low: 0, high: 1}"],
    ),
    Case("tune", "`tune --resume` a folder that holds no search", _tune_resume_plain),
    Case(
        "cluster",
        "cluster.yaml with a misspelt key",
        lambda fx: ["check-cluster", str(_misspelt_cluster(fx))],
    ),
    Case(
        "cluster",
        "RayJob manifest without an entrypoint",
        lambda fx: ["check-cluster", str(_rayjob_no_entry(fx))],
    ),
    Case(
        "jobs",
        "`jobs/train.py --config` a file that does not exist",
        lambda fx: ["train", "--config", str(fx.root / "configs" / "missing.yaml")],
    ),
]


def _write(fx: Fixtures, name: str, text: str) -> Path:
    p = fx.path(name)
    p.write_text(text)
    return p


def _train_unsplit(fx: Fixtures) -> list[str]:
    from raycell.data.synthetic import write_synthetic

    d = fx.path("unsplit")
    write_synthetic(str(d), n_cells=60, crop_size=32, rows_per_shard=60, seed=2)
    return ["train", "--data", str(d), "--runs-dir", str(fx.root / "runs")]


def _predictions(self: Fixtures) -> Path:
    """Predictions of the fixture checkpoint over the tiny data (needs Ray)."""
    if "pred" not in self._cache:
        from raycell.__main__ import run

        out = self.root / "fixture_pred"
        run(
            [
                "infer",
                "--checkpoint",
                str(self.checkpoint()),
                "--data",
                str(self.data()),
                "--out",
                str(out),
                "--set",
                "ray.progress=false",
            ]
        )
        self._cache["pred"] = out
    return self._cache["pred"]


Fixtures.predictions = _predictions


# --------------------------------------------------------------------------------------------------
# Ingest: bad images do not stop a run, they become rows of the rejects table
# --------------------------------------------------------------------------------------------------

# (what was done to the raw folder, the file or field it was done to) -> shown next to the reject row
# --------------------------------------------------------------------------------------------------
# Outputs a user must never lose, and when the machine is the problem
# --------------------------------------------------------------------------------------------------


def _embeddings(fx: Fixtures, name: str = "emb", dataset: str = "") -> Path:
    """A small embeddings folder in the profiling layout (two shards), written without Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = fx.path(name)
    (d / "shards").mkdir(parents=True)
    n, rng = 12, np.random.default_rng(0)
    feats = [f"Cells_Embedding_{j:04d}" for j in range(4)]
    t = pa.table(
        {
            "Metadata_Plate": ["P1"] * n,
            "Metadata_Well": [f"A{i % 3:02d}" for i in range(n)],
            "Metadata_CellID": [f"c{i}" for i in range(n)],
            **{f: rng.normal(size=n).astype(np.float32) for f in feats},
        }
    )
    for i in range(2):
        pq.write_table(t.slice(6 * i, 6), d / "shards" / f"part-0000{i}.parquet")
    (d / "embeddings.json").write_text(
        json.dumps(
            {
                "layout": "columns",
                "features": feats,
                "heads": {},
                "dataset": dataset,
                "shards": [{"file": f"shards/part-0000{i}.parquet"} for i in range(2)],
            }
        )
    )
    return d


def _export(fx: Fixtures, out: Path, *extra: str, emb: Path | None = None) -> list[str]:
    return ["export", "--embeddings", str(emb or _embeddings(fx)), "--out", str(out), *extra]


def _users_h5ad(fx: Fixtures) -> list[str]:
    f = fx.path("mine.h5ad")
    f.write_bytes(b"the user's own AnnData")
    return _export(fx, f, "--overwrite")


def _users_file_kept(fx: Fixtures) -> str:
    kept = (fx.root / "mine.h5ad").read_bytes() == b"the user's own AnnData"
    return "" if kept else "the user's file was replaced"


def _into_shard(fx: Fixtures) -> list[str]:
    d = fx.copy(fx.data(), "data_export_target")
    shard = sorted((d / "shards").glob("part-*.parquet"))[0]
    fx._cache["shard_bytes"] = (shard, shard.read_bytes())
    return _export(
        fx, shard, "--format", "parquet", "--overwrite", emb=_embeddings(fx, dataset=str(d))
    )


def _shard_kept(fx: Fixtures) -> str:
    shard, before = fx._cache["shard_bytes"]
    return "" if shard.read_bytes() == before else "a shard of the data set was replaced"


def _dup_shard(fx: Fixtures) -> list[str]:
    emb = _embeddings(fx, "emb_dup")
    shutil.copy(emb / "shards" / "part-00000.parquet", emb / "shards" / "part-00002.parquet")
    return _export(fx, fx.path("dup.h5ad"), emb=emb)


def _no_delete_advice(fx: Fixtures) -> str:
    return ""  # verdict checks exit 2 and one line; the line itself is in the table


def _hold_lock(fx: Fixtures, out: Path) -> None:
    """A live process that holds the output lock of `out` (another run writing it)."""
    import subprocess

    code = (
        "import sys\nfrom raycell.utils.locks import writing\n"
        f"with writing({str(out)!r}):\n    print('ready', flush=True)\n    sys.stdin.read()\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    holder.stdout.readline()
    fx._cache.setdefault("holders", []).append(holder)


def _release(fx: Fixtures) -> str:
    for holder in fx._cache.pop("holders", []):
        holder.stdin.close()
        holder.wait(timeout=30)
    return ""


def _busy_infer(fx: Fixtures) -> list[str]:
    out = fx.path("busy_pred")
    out.mkdir()
    _hold_lock(fx, out)
    return _infer(fx)[:-4] + ["--out", str(out), *_set("ray.progress=false")]


def _busy_ingest(fx: Fixtures) -> list[str]:
    out = fx.path("busy_ingest")
    _hold_lock(fx, out)
    return fx.ingest_args(fx.raw(), out)


def _busy_resume(fx: Fixtures) -> list[str]:
    from raycell.config import load_config, save_config

    run = fx.copy(fx.checkpoint(), "busy_run")
    save_config(
        load_config(
            None, [f"data.path={fx.data()}", "model.type=conventional", "model.preset=tiny"]
        ),
        run / "config.yaml",
    )
    _hold_lock(fx, run)
    return ["train", "--resume", str(run)]


@contextlib.contextmanager
def _fault(target: str, code: int, after: int = 0):
    """`target` (module:attribute) raises OSError(code) from its `after`+1-th call on."""
    import errno as _errno  # noqa: F401 - the codes below are errno's
    import importlib
    from unittest import mock

    module, attr = target.split(":")
    obj = importlib.import_module(module)
    *owners, name = attr.split(".")
    for o in owners:
        obj = getattr(obj, o)
    real, calls = getattr(obj, name), []

    def faulty(*a, **k):
        calls.append(1)
        if len(calls) > after:
            path = next((str(x) for x in a if isinstance(x, (str, Path))), "")
            raise OSError(code, os.strerror(code), path)
        return real(*a, **k)

    with mock.patch.object(obj, name, faulty):
        yield


@contextlib.contextmanager
def _signal_when_writing(fx: Fixtures, signum: int, name: str):
    """Send `signum` to this process once the synth run into `name` has written a shard."""
    import signal as _signal
    import threading

    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if any(fx.root.glob(f"{name}.partial-*/shards/part-*.parquet")):
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    before = _signal.getsignal(_signal.SIGTERM)
    before_int = _signal.getsignal(_signal.SIGINT)
    # a process started in the background ignores SIGINT (no KeyboardInterrupt): Ctrl-C as at a terminal
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        _signal.signal(_signal.SIGTERM, before)
        _signal.signal(_signal.SIGINT, before_int)


@contextlib.contextmanager
def _ray_start_times_out():
    from unittest import mock

    import ray

    def slow(**kw):
        raise Exception("The current node timed out during startup. This could happen because ...")

    with (
        mock.patch.object(ray, "init", slow),
        mock.patch.object(ray, "is_initialized", lambda: False),
    ):
        yield


def _synth(fx: Fixtures, name: str, n: int = 2000) -> list[str]:
    return [
        "synth",
        "--out",
        str(fx.path(name)),
        *_set(f"synth.n_cells={n}", "synth.crop_size=32", "synth.rows_per_shard=500"),
    ]


def _nothing_at(name: str) -> Callable[[Fixtures], str]:
    return lambda fx: "" if not (fx.root / name).exists() else f"{name} was left behind"


def _disk_of(free_mib: int):
    import shutil as _shutil
    from collections import namedtuple
    from unittest import mock

    usage = namedtuple("usage", "total used free")
    return mock.patch.object(_shutil, "disk_usage", lambda p: usage(10 << 30, 0, free_mib << 20))


def _tune(fx: Fixtures, entry: str) -> list[str]:
    return [
        "tune",
        "--data",
        str(fx.data()),
        "--model",
        "adversarial",
        *_set("model.preset=tiny", f"tune.out={fx.path('search')}", f"tune.space.{entry}"),
    ]


CASES += [
    Case(
        "outputs",
        "`export --out` a file of the user's, with `--overwrite`",
        _users_h5ad,
        check=_users_file_kept,
        section=LOST,
    ),
    Case(
        "outputs",
        "`export --out` a shard of the input data set",
        _into_shard,
        check=_shard_kept,
        section=LOST,
    ),
    Case(
        "outputs",
        "`embed --out` the data set itself",
        lambda fx: [
            "embed",
            "--checkpoint",
            str(fx.checkpoint()),
            "--data",
            str(fx.data()),
            "--out",
            str(fx.data()),
        ],
        check=_no_delete_advice,
        section=LOST,
    ),
    Case(
        "outputs",
        "`infer --out` a folder of the user's files",
        lambda fx: _infer(fx)[:-4] + ["--out", str(fx.user_folder("uf_pred"))],
        check=_uf("uf_pred"),
        section=LOST,
    ),
    Case("export", "embeddings with a duplicated shard", _dup_shard, section=LOST),
    Case(
        "train",
        "a continuous column (`centroid_x`) as a `data.heads` head",
        lambda fx: _train(fx, "--model", "timm", "--set", "data.heads=[centroid_x]"),
        section=LOST,
    ),
    # -- when the machine is the problem
    Case(
        "disk",
        "`synth`: the disk fills up mid-run",
        lambda fx: _synth(fx, "full_synth"),
        during=lambda fx: _fault("raycell.formats.shards:atomic_write_parquet", 28, after=2),
        check=_nothing_at("full_synth"),
        section=MACHINE,
    ),
    Case(
        "disk",
        "`synth`: the disk cannot hold the data set (checked first)",
        lambda fx: _synth(fx, "small_disk", 20000),
        during=lambda fx: _disk_of(1),
        check=_nothing_at("small_disk"),
        section=MACHINE,
    ),
    Case(
        "disk",
        "`export --format h5ad`: the disk fills up",
        lambda fx: _export(fx, fx.path("full.h5ad")),
        during=lambda fx: _fault("anndata:AnnData.write_h5ad", 28),
        check=_nothing_at("full.h5ad"),
        section=MACHINE,
    ),
    Case(
        "disk",
        "`export`: output on a read-only file system",
        lambda fx: _export(fx, fx.path("ro.csv"), "--format", "csv"),
        during=lambda fx: _fault("pandas:DataFrame.to_csv", 30),
        check=_nothing_at("ro.csv"),
        section=MACHINE,
    ),
    Case(
        "disk",
        "`report`: output folder not writable (permission denied)",
        lambda fx: ["report", str(_embeddings(fx, "emb_report"))],
        during=lambda fx: _fault("raycell.utils.io:_tmp_path", 13),
        section=MACHINE,
    ),
    Case(
        "signal",
        "Ctrl-C during `synth`",
        lambda fx: _synth(fx, "sig_synth_int", 20000),
        expect=130,
        during=lambda fx: _signal_when_writing(fx, 2, "sig_synth_int"),
        check=_nothing_at("sig_synth_int"),
        section=MACHINE,
    ),
    Case(
        "signal",
        "SIGTERM during `synth`",
        lambda fx: _synth(fx, "sig_synth_term", 20000),
        expect=143,
        during=lambda fx: _signal_when_writing(fx, 15, "sig_synth_term"),
        check=_nothing_at("sig_synth_term"),
        section=MACHINE,
    ),
    Case(
        "ray",
        "a local Ray that does not start in time (busy machine)",
        lambda fx: [
            "embed",
            "--checkpoint",
            str(fx.checkpoint()),
            "--data",
            str(fx.data()),
            "--out",
            str(fx.path("emb_busy")),
            *_set("ray.start_timeout_s=1"),
        ],
        during=lambda fx: _ray_start_times_out(),
        section=MACHINE,
    ),
    Case(
        "tune",
        "`model.args.nonsense_arg` in the space",
        lambda fx: _tune(fx, "model.args.nonsense_arg={dist: choice, values: [1, 2]}"),
        section=MACHINE,
    ),
    Case(
        "tune",
        'a `choice` mixing `8`, `"sixteen"`, `true`',
        lambda fx: _tune(fx, "model.args.latent_dim={dist: choice, values: [8, sixteen, true]}"),
        section=MACHINE,
    ),
    Case(
        "segmentation",
        "`segmentation-eval --iou 0`",
        lambda fx: ["segmentation-eval", "--iou", "0", str(fx.root / "raw")],
        section=MACHINE,
    ),
    Case(
        "two runs",
        "`infer` into a folder another live run is writing",
        _busy_infer,
        check=_release,
        section=MACHINE,
    ),
    Case(
        "two runs",
        "`ingest` into an `--out` another live run is writing",
        _busy_ingest,
        check=_release,
        section=MACHINE,
    ),
    Case(
        "two runs",
        "`train --resume` of a run another live run is resuming",
        _busy_resume,
        check=_release,
        section=MACHINE,
    ),
]


INGEST_DAMAGE: list[tuple[str, str]] = []


def _damage_raw(fx: Fixtures) -> Path:
    """12 fields of view (96 px), one of each kind of damage (module-level `INGEST_DAMAGE` lists them)."""
    import tifffile

    from raycell.data.synthetic_raw import write_synthetic_raw

    raw = fx.path("raw_damaged")
    write_synthetic_raw(
        raw,
        effects="basic",
        seed=2,
        n_batches=1,
        n_lines=2,
        wells=4,
        fields=3,
        fov_size=96,
        cells_per_fov=5,
    )
    d = raw / "images" / "batch00"
    INGEST_DAMAGE.clear()

    def note(what: str, name: str) -> None:
        INGEST_DAMAGE.append((what, name))

    (d / "SYN00_A01_s0_nucleus_z1.tif").write_bytes(b"")
    note("a zero-byte TIFF", "SYN00_A01_s0_nucleus_z1.tif")
    f = d / "SYN00_A01_s1_cytoplasm_z0.tif"
    f.write_bytes(f.read_bytes()[:900])
    note("a truncated TIFF", f.name)
    f = d / "SYN00_A01_s2_nucleus_z2.tif"
    tifffile.imwrite(f, np.stack([tifffile.imread(f)] * 2))
    note("a 2-plane TIFF where one Z-slice is expected", f.name)
    (d / "SYN00_A02_s0_cytoplasm_z2.tif").unlink()
    note("a Z-slice deleted", "SYN00_A02_s0 (cytoplasm z2)")
    shutil.copy(d / "SYN00_A02_s1_nucleus_z1.tif", d / "SYN00_A02_s1_nucleus_z01.tif")
    note("a stray file spelling Z as `z01` among `z1`", "SYN00_A02_s1_nucleus_z01.tif")
    for f in d.glob("SYN00_A03_s0_*.tif"):
        tifffile.imwrite(f, tifffile.imread(f).astype(np.uint32) * 1000)
    note("a field saved as uint32 at 1000x the plate's intensity", "SYN00_A03_s0 (all files)")
    for f in d.glob("SYN00_A03_s1_*.tif"):
        tifffile.imwrite(f, (tifffile.imread(f) / 65535.0).astype(np.float32))
    note("a field saved as float in [0, 1] among uint16 fields", "SYN00_A03_s1 (all files)")
    (d / "notes_scan.tif").write_bytes(b"II*\x00 not really a tiff")
    note("a file whose name does not match the pattern", "notes_scan.tif")
    pm = raw / "platemap.csv"
    lines = pm.read_text().splitlines()
    lines = [ln for ln in lines if ",A04," not in ln]
    lines = [lines[0]] + [ln.replace(",high,", ", high ,") for ln in lines[1:]]
    pm.write_text("\n".join(lines) + "\n")
    note("well A04 left out of the plate map", "SYN00_A04 (3 fields)")
    note("plate-map values padded with spaces (' high ')", "platemap.csv")
    return raw


def ingest_rejects(fx: Fixtures) -> tuple[pd.DataFrame, dict, str]:
    """Ingest the damaged folder; (rejects table, summary, error line or '')."""
    from raycell.__main__ import main

    raw = _damage_raw(fx)
    out = fx.path("ingest_damaged_out")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as so:
        code = main(fx.ingest_args(raw, out))
    if code != 0:
        return pd.DataFrame(), {}, err.getvalue().strip().splitlines()[-1]
    summary = json.loads((out / "ingest_summary.json").read_text())
    summary["printed"] = [ln for ln in so.getvalue().splitlines() if ln.startswith("[raycell]")]
    return pd.read_parquet(out / "rejects.parquet"), summary, ""


def ingest_markdown(rej: pd.DataFrame, summary: dict, error: str) -> str:
    """The ingest section of docs/bad_inputs.md."""
    lines = [
        "## Ingest: bad images become rows of the rejects table",
        "",
        "One `raycell ingest` over 12 synthetic fields of view (2 channels x 3 Z-slices, 96 px) damaged as",
        "listed below. The run goes on; every input file and field is accounted for: the damaged ones are",
        "rows of `rejects.parquet` (kind, code, reason, files), the rest are crops.",
        "",
    ]
    if error:
        return "\n".join(lines + [f"**The run failed:** `{error}`", ""])
    lines += ["| damage | where |", "|---|---|"]
    lines += [f"| {what} | `{where}` |" for what, where in INGEST_DAMAGE]
    lines += ["", "| kind | field of view | code | reason |", "|---|---|---|---|"]
    for r in rej.itertuples():
        reason = str(r.reason).replace("|", "\\|")
        if len(reason) > 220:
            reason = reason[:217] + "..."
        fov = r.fov_id or (str(r.files).split("'")[1] if "'" in str(r.files) else str(r.files))
        lines.append(f"| {r.kind} | `{fov}` | `{r.code}` | {reason} |")
    lines += [
        "",
        f"Accounting: {summary['n_fovs_in']} fields in = {summary['n_fovs_with_cells']} with cells "
        f"+ {summary['n_fovs_rejected']} rejected; {summary['n_files_rejected']} file(s) rejected; "
        f"{summary['n_cells']} cells.",
        "",
        "What the command printed:",
        "",
        "```",
    ]
    lines += summary.get("printed", []) + ["```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_case(case: Case, fx: Fixtures) -> dict:
    """Set up and run one case in this process; returns what the user saw."""
    import ray

    from raycell.__main__ import main

    try:
        argv = case.setup(fx)
    except Exception as exc:  # noqa: BLE001 - a broken case setup is reported, not fatal
        return {
            "status": "setup failed",
            "stderr": f"{type(exc).__name__}: {exc}",
            "lines": 0,
            "ray": False,
            "seconds": 0.0,
            "data": "",
            "argv": [],
        }
    if ray.is_initialized():  # each case starts from no Ray (a setup may have started one)
        ray.shutdown()
    err, out = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    fault = case.during(fx) if case.during else contextlib.nullcontext()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), fault:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 - a traceback is what the user would have seen
            traceback.print_exc()
            code = "traceback"
    seconds = time.perf_counter() - t0
    started = ray.is_initialized()
    if started:
        ray.shutdown()
    text = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    errors = [ln for ln in text if ln.startswith("raycell: error:") or ln.startswith("raycell: ")]
    shown = errors[-1] if errors else (text[-1] if text else "")
    return {
        "status": code,
        "stderr": shown,
        "lines": len(text),
        "ray": started,
        "seconds": round(seconds, 1),
        "data": case.check(fx) if case.check else "",
        "argv": argv,
    }


def verdict(case: Case, r: dict) -> str:
    """'' when the case keeps the promise, else what is wrong."""
    problems = []
    if r["status"] != case.expect:
        problems.append(f"exit {r['status']} (expected {case.expect})")
    if case.expect == 2 and (
        not r["stderr"].startswith("raycell: error:") or (r["lines"] != 1 and not r["ray"])
    ):
        problems.append("no one-line error")
    if r["data"]:
        problems.append(r["data"])
    return "; ".join(problems)


def to_markdown(cases: list[Case], env: str) -> str:
    """The table of docs/bad_inputs.md."""
    lines = [
        "# Bad input: what you see",
        "",
        "Generated by `.venv/bin/python docs/bad_inputs.py` (do not edit by hand). Each row is one bad",
        "input given to one `raycell` command; **exit** is the status (2 = a user error, reported in one",
        "line on stderr); **Ray** says whether Ray was started before the error (errors that can be found",
        "without Ray are found first); **ok** is whether the promise holds (exit code, one line, and for",
        "output folders: the user's files are still there). Ingest problems inside images (unreadable,",
        "empty or out-of-scale files, missing channels or Z-slices, plate-map gaps) do not stop a run: they",
        "become rows of the rejects table, see [ingest.md](ingest.md).",
        "",
        env,
        "",
        "| area | bad input | exit | what the user sees (last stderr line) | stderr lines | Ray | s | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + _rows([c for c in cases if not c.section])) + "\n"


def _rows(cases: list[Case]) -> list[str]:
    """One table row per case, as the tables of docs/bad_inputs.md show them."""
    lines = []
    root = str(FX_ROOT[0]) if FX_ROOT else ""
    for c in cases:
        r = c.result
        msg = r["stderr"].replace(root, "…").replace("|", "\\|")
        if len(msg) > 300:
            msg = msg[:297] + "..."
        bad = verdict(c, r)
        lines.append(
            f"| {c.area} | {c.what} | {r['status']} | `{msg}` | {r['lines']} | "
            f"{'yes' if r['ray'] else 'no'} | {r['seconds']} | {'yes' if not bad else 'NO: ' + bad} |"
        )
    return lines


SECTIONS = {
    LOST: [
        "Every command that writes follows the same output rules: it never replaces a file or folder",
        "raycell did not write (not even with `--overwrite`), never writes inside an input, never tells",
        "the user to delete their inputs, and replaces its own earlier output through a temporary name",
        "and an atomic rename (raycell/utils/outputs.py; tests/test_output_safety.py). **ok** includes:",
        "the user's file or the data set is byte-for-byte unchanged. Also here: inputs that would otherwise",
        "give a wrong result without a word (a copied shard counted twice, a measurement as a head).",
    ],
    MACHINE: [
        "A full, read-only or forbidden disk, Ctrl-C or `kill`, a busy machine, two runs writing one",
        "output. A fault the machine would cause is injected into this process (a test cannot fill a",
        "real disk or remount one read-only): the writer, or `ray.init`, raises what the system",
        "would. Exit 2 = one line naming the folder and what to do; 130 / 143 = interrupted by",
        "SIGINT / SIGTERM (one line saying how to resume or re-run); nothing half-written is left",
        "where a later run would read it. An output being written holds a lock (pid, host, start",
        "time) beside it, which a second run respects (raycell/utils/locks.py;",
        "tests/test_machine_problems.py, tests/test_locks.py).",
    ],
}


def section_markdown(heading: str, cases: list[Case]) -> str:
    """One of the SECTIONS of docs/bad_inputs.md, with its table."""
    lines = [
        heading,
        "",
        *SECTIONS[heading],
        "",
        "| area | situation | exit | what the user sees (last stderr line) | stderr lines | Ray | s | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + _rows([c for c in cases if c.section == heading])) + "\n"


FX_ROOT: list[Path] = []


def _replace_section(doc: Path, heading: str, section: str) -> None:
    """Put `section` in place of the one under `heading` in `doc` (before the ingest section if new)."""
    text = doc.read_text()
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    else:
        at = text.find("\n## Ingest")
        text = (
            (text[: at + 1] + section + "\n" + text[at + 1 :]) if at >= 0 else text + "\n" + section
        )
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Run the cases; write the table (unless --check with --no-ray); exit 1 on a broken promise
    with --check.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default=str(ROOT / "docs" / "bad_inputs.md"), help="markdown file to write"
    )
    ap.add_argument(
        "--no-ray", action="store_true", help="only the cases that need no Ray to set up"
    )
    ap.add_argument("--check", action="store_true", help="exit 1 if any case breaks its promise")
    ap.add_argument("--only", default="", help="substring of the case description to run")
    ap.add_argument(
        "--sections",
        action="store_true",
        help="only the cases of the sections after the main table (outputs never lost, the "
        "machine is the problem); rewrite those sections alone",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    cases = [
        c
        for c in CASES
        if (not args.no_ray or not c.ray)
        and args.only in c.what
        and (c.section or not args.sections)
    ]
    with tempfile.TemporaryDirectory(prefix="raycell-bad-inputs-") as tmp:
        fx = Fixtures(Path(tmp))
        FX_ROOT[:] = [Path(tmp)]
        for c in cases:
            c.result = run_case(c, fx)
            bad = verdict(c, c.result)
            print(
                f"{'ok ' if not bad else 'BAD'} {c.area:<10} {c.what:<58} exit={c.result['status']} "
                f"{c.result['seconds']:>5}s  {c.result['stderr'][:140]}"
                + (f"   <- {bad}" if bad else ""),
                file=sys.__stdout__,
                flush=True,
            )
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if args.sections and not args.only:
            for heading in SECTIONS:
                _replace_section(
                    Path(args.out), heading, section_markdown(heading, cases).replace(tmp, "…")
                )
            print(f"wrote the sections {list(SECTIONS)} of {args.out}", file=sys.__stdout__)
        elif not args.no_ray and not args.only:
            import platform

            env = (
                f"Last generated {time.strftime('%Y-%m-%d')} on {platform.system()} {platform.machine()}, "
                f"{os.cpu_count()} cores; paths under the scratch folder are shown as `…`."
            )
            rej, summary, error = ingest_rejects(fx)
            if ray.is_initialized():
                ray.shutdown()
            print(f"ingest: {len(rej)} reject row(s) {error}", file=sys.__stdout__)
            text = (
                to_markdown(cases, env)
                + "\n"
                + "".join(section_markdown(h, cases) + "\n" for h in SECTIONS)
                + ingest_markdown(rej, summary, error)
            )
            Path(args.out).write_text(text.replace(tmp, "…"))
            print(f"wrote {args.out}", file=sys.__stdout__)
    broken = [c.what for c in cases if verdict(c, c.result)]
    if args.check:
        # a case that needs no Ray promises its error before Ray starts; the table lists every case
        broken += [f"{c.what}: Ray was started" for c in cases if not c.ray and c.result["ray"]]
        table = Path(args.out).read_text() if Path(args.out).is_file() else ""
        broken += [f"{c.what}: not in {args.out}" for c in cases if f"| {c.what} |" not in table]
        for problem in broken:
            print(f"BAD {problem}", file=sys.__stdout__)
    return 1 if (args.check and broken) else 0


if __name__ == "__main__":
    sys.exit(main())
