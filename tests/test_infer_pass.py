"""One inference pass serves several outputs (`predict_many`) and gives what a plain loop gives.

Checkpoints are untrained models saved for the tiny data set (no Ray Train needed).
"""

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import tiny_overrides
from helpers import untrained_checkpoint

from raycell import constants as K
from raycell.config import ConfigError, load_config
from raycell.formats.shards import open_dataset

SPLITS = [K.TEST, K.UNSEEN]


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory) -> dict:
    """Two checkpoints and a fixed soft Z for the unseen cells of the tiny set."""
    from raycell.zpredictor import run_fixed_z

    root = tmp_path_factory.mktemp("pass")
    cks = {
        m: untrained_checkpoint(tiny_data, root / m, m) for m in ("conventional", "mixedeffects")
    }
    z = root / "z"
    run_fixed_z(
        load_config(None, [f"data.path={tiny_data}", f"infer.z_out={z}", "infer.z_mode=uniform"])
    )
    return {"root": root, "cks": cks, "z": z}


def _cfg(data, ck, out, *extra):
    over = tiny_overrides(data, Path(out).parent / "runs")
    splits = f"infer.splits=[{','.join(SPLITS)}]"
    return load_config(None, over + [f"infer.checkpoint={ck}", f"infer.out={out}", splits, *extra])


def _plain(data: Path, ck: Path, **kw) -> dict[str, pa.Table]:
    """A Ray-free loop: each input shard's rows of SPLITS through one `CropPredictor`."""
    from raycell.infer.predictor import PASSTHROUGH, CropPredictor

    pred = CropPredictor(str(ck), device="cpu", passthrough=PASSTHROUGH, **kw)
    out = {}
    for p in open_dataset(data).shard_paths:
        t = pq.read_table(p)
        t = t.filter(pc.is_in(t.column(K.SPLIT), pa.array(SPLITS)))
        out[Path(p).name] = pred(t)
    return out


def _assert_same(folder: Path, want: dict[str, pa.Table]) -> None:
    for name, w in want.items():
        got = pq.read_table(folder / "shards" / name)
        assert got.num_rows == w.num_rows, name
        if not w.num_rows:
            continue
        assert got.column_names == w.column_names, name
        for c in w.column_names:
            a, b = got.column(c).combine_chunks(), w.column(c).combine_chunks()
            if pa.types.is_fixed_size_list(b.type) or pa.types.is_floating(b.type):
                flat = (lambda x: x.flatten()) if pa.types.is_fixed_size_list(b.type) else None
                x = np.asarray(flat(a) if flat else a, np.float64)
                y = np.asarray(flat(b) if flat else b, np.float64)
                np.testing.assert_allclose(x, y, atol=1e-5, err_msg=f"{name} {c}")
            else:
                assert a.equals(b), (name, c)


@pytest.mark.ray
def test_one_pass_serves_every_output_as_a_plain_loop_would(setup, tiny_data, ray_local, tmp_path):
    from raycell.infer.batch import predict_many

    cks, z = setup["cks"], setup["z"]
    outs = {k: tmp_path / k for k in ("conv", "me_z", "me_rand")}
    cfgs = [
        _cfg(tiny_data, cks["conventional"], outs["conv"]),
        _cfg(tiny_data, cks["mixedeffects"], outs["me_z"], f"infer.z_source={z}"),
        _cfg(tiny_data, cks["mixedeffects"], outs["me_rand"], "infer.randomize_z=true"),
    ]
    manifests = predict_many(cfgs)
    n = sum(open_dataset(tiny_data).manifest.counts_per_split.get(s, 0) for s in SPLITS)
    assert [m["n_rows"] for m in manifests] == [n, n, n]
    assert [m["out"] for m in manifests] == [str(o) for o in outs.values()]
    _assert_same(outs["conv"], _plain(tiny_data, cks["conventional"]))
    _assert_same(outs["me_z"], _plain(tiny_data, cks["mixedeffects"], z_source=str(z)))
    _assert_same(outs["me_rand"], _plain(tiny_data, cks["mixedeffects"], randomize_z=True))
    me = pq.read_table(outs["me_z"] / "shards")
    rand = pq.read_table(outs["me_rand"] / "shards")
    assert not np.allclose(  # the two outputs of one checkpoint did get their own Z
        np.asarray(me.column(K.LATENT_RE).combine_chunks().flatten()),
        np.asarray(rand.column(K.LATENT_RE).combine_chunks().flatten()),
    )


@pytest.mark.ray
def test_a_pass_resumes_each_output_where_it_stopped(setup, tiny_data, ray_local, tmp_path):
    """Outputs with different shards to go share one pass; finished shards are not rewritten."""
    from raycell.infer.batch import predict, predict_many

    cks = setup["cks"]
    a, b = tmp_path / "a", tmp_path / "b"
    predict(_cfg(tiny_data, cks["conventional"], a))
    first = sorted((a / "shards").iterdir())
    kept = {f.name: f.stat().st_mtime_ns for f in first[1:]}
    first[0].unlink()  # one shard of output a still to do; every shard of output b
    ma, mb = predict_many(
        [
            _cfg(tiny_data, cks["conventional"], a),
            _cfg(tiny_data, cks["mixedeffects"], b, "infer.randomize_z=true"),
        ]
    )
    assert {f.name: f.stat().st_mtime_ns for f in sorted((a / "shards").iterdir())[1:]} == kept
    _assert_same(a, _plain(tiny_data, cks["conventional"]))
    _assert_same(b, _plain(tiny_data, cks["mixedeffects"], randomize_z=True))
    assert ma["n_rows"] == mb["n_rows"] > 0


def test_outputs_of_one_pass_share_data_and_splits_and_not_folders(setup, tiny_data, tmp_path):
    """Refused before Ray starts (no `ray_local`): one line naming what differs."""
    from raycell.infer.batch import predict_many

    ck = setup["cks"]["conventional"]
    other = tmp_path / "data2"
    shutil.copytree(tiny_data, other)
    with pytest.raises(ConfigError, match="one inference pass reads one data set and splits"):
        predict_many([_cfg(tiny_data, ck, tmp_path / "a"), _cfg(other, ck, tmp_path / "b")])
    with pytest.raises(ConfigError, match="go to the same folder"):
        predict_many(
            [
                _cfg(tiny_data, ck, tmp_path / "a"),
                _cfg(tiny_data, ck, tmp_path / "a", "infer.randomize_z=true"),
            ]
        )


def test_collector_writes_a_shard_once_all_its_rows_came(tmp_path):
    """Driver side, no Ray: rows in several blocks, one write per shard, extra rows refused, shards
    without rows of the splits written empty with the columns of the others."""
    from raycell.formats.shards import ShardError
    from raycell.infer.batch import InferJob, _ShardCollector

    (tmp_path / "shards").mkdir()
    inputs = {n: {"file": f"/in/{n}"} for n in ("a.parquet", "b.parquet")}
    plan = InferJob(
        Path("ck"), None, None, tmp_path, [], "", {"k": 1}, inputs, pending=list(inputs)
    )
    c = _ShardCollector(plan, {"a.parquet": 3, "b.parquet": 0})
    lat = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 2)
    t = pa.table({K.CELL_ID: ["x1", "x2", "x3"], K.LATENT: lat, "path": ["/in/a.parquet"] * 3})
    c.add(t.slice(0, 2))
    assert not (tmp_path / "shards" / "a.parquet").exists()  # not before its last row
    c.add(t.slice(2))
    got = pq.read_table(tmp_path / "shards" / "a.parquet")
    assert (
        got.column(K.CELL_ID).to_pylist() == ["x1", "x2", "x3"] and "path" not in got.column_names
    )
    with pytest.raises(ShardError, match="returned 4 rows for input shard /in/a.parquet"):
        c.add(t.slice(0, 1))
    c.finish()
    empty = pq.read_table(tmp_path / "shards" / "b.parquet")
    assert empty.num_rows == 0 and empty.schema.names == got.schema.names
