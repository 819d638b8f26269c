"""`raycell profile`: well profiles normalised per plate against controls, copairs metrics."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

from raycell.__main__ import main
from raycell.errors import UserError
from raycell.profiling.profile_folder import ProfileSettings, make_profiles, profile
from raycell.profiling.retrieval import RetrievalSettings, activity_map
from raycell.profiling.table import ProfileError
from raycell.profiling.wellprofiles import (
    ProfileTable,
    build_profiles,
    control_mask,
    filter_rows,
    normalize_plates,
    prepare,
    read_input,
)

LINCS = (
    SHARED_DATA
    / "lincs_cellpainting_profiles_SQ00015054"
    / "SQ00015054_normalized_feature_select.csv.gz"
)
DMSO = "Metadata_broad_sample == 'DMSO'"


def _tiny() -> pd.DataFrame:
    """Two treatments and two controls whose cosine rankings are worked out in the test below."""
    rows = [
        ("A", 1.0, 0.0),
        ("A", 1.0, 0.1),
        ("B", 0.0, 1.0),
        ("B", 1.0, 0.05),
        ("DMSO", 0.1, 1.0),
        ("DMSO", -1.0, 0.2),
    ]
    return pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": [f"A0{i}" for i in range(1, 7)],
            "Metadata_treatment": [r[0] for r in rows],
            "Cells_x": [r[1] for r in rows],
            "Cells_y": [r[2] for r in rows],
        }
    )


def _settings(tmp_path, inp, **kw) -> ProfileSettings:
    base = dict(
        input=str(inp),
        out=str(tmp_path / "out"),
        controls="Metadata_treatment == 'DMSO'",
        normalize="none",
        feature_select=(),
        treatment=("Metadata_treatment",),
        null_size=1000,
    )
    return ProfileSettings(**{**base, **kw})


def test_activity_map_equals_the_hand_computed_average_precisions(tmp_path):
    # A1=(1,0): its replicate A2 is nearest (cos 0.995 vs DMSO 0.0995 and -0.98): AP 1; A2 alike.
    # B1=(0,1): DMSO1 (0.995) and DMSO2 (0.196) rank above B2 (0.05): AP 1/3.
    # B2=(1,.05): DMSO1 (0.149) ranks above B1 (0.05), DMSO2 below: AP 1/2.
    f = tmp_path / "tiny.csv"
    _tiny().to_csv(f, index=False)
    t, res = make_profiles(_settings(tmp_path, f))
    table = res.activity.set_index("treatment")
    assert table.loc["A", "mean_average_precision"] == pytest.approx(1.0)
    assert table.loc["B", "mean_average_precision"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert list(res.activity["treatment"]) == ["A", "B"]  # sorted by mAP, controls not listed
    assert res.summary["activity"]["n_treatments"] == 2


def test_profile_folder_is_written_and_refused_again_without_overwrite(tmp_path):
    f = tmp_path / "tiny.csv"
    _tiny().to_csv(f, index=False)
    s = _settings(tmp_path, f)
    res = profile(s)
    out = tmp_path / "out"
    man = json.loads((out / "profile.json").read_text())
    assert man["generator"] == "raycell.profile" and man["n_profiles"] == 6
    assert len(pd.read_csv(out / "activity_map.csv")) == 2
    assert len(pd.read_parquet(out / "consensus.parquet")) == 3
    assert res["retrieval"]["activity"]["n_treatments"] == 2
    with pytest.raises(UserError, match="already holds a profile folder"):
        profile(s)
    profile(ProfileSettings(**{**s.__dict__, "overwrite": True}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="raycell did not write"):
        profile(ProfileSettings(**{**s.__dict__, "out": str(tmp_path / "mine")}))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "controls, message",
    [
        ("Metadata_compound == 'DMSO'", "no column|not defined|Metadata_compound"),
        ("Metadata_treatment == 'PBS'", "matches none of the 6 profiles"),
    ],
)
def test_bad_control_query_is_one_line(tmp_path, capsys, controls, message):
    f = tmp_path / "tiny.csv"
    _tiny().to_csv(f, index=False)
    with pytest.raises(UserError, match=message):
        make_profiles(_settings(tmp_path, f, controls=controls, normalize="mad_robustize"))
    rc = main(
        [
            "profile",
            "--input",
            str(f),
            "--out",
            str(tmp_path / "o"),
            "--controls",
            controls,
            "--treatment",
            "Metadata_treatment",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("raycell: error: profile.controls") and "\n" not in err


def test_a_plate_without_controls_is_refused_by_name(tmp_path):
    df = pd.concat([_tiny(), _tiny().assign(Metadata_Plate="P2")], ignore_index=True)
    p2_dmso = (df.Metadata_Plate == "P2") & (df.Metadata_treatment == "DMSO")
    df.loc[p2_dmso, "Metadata_treatment"] = "C"
    t = ProfileTable(df, ["Cells_x", "Cells_y"])
    with pytest.raises(UserError, match="matches no well of plate Metadata_Plate=P2"):
        normalize_plates(t, "Metadata_treatment == 'DMSO'", "mad_robustize")


def test_each_plate_is_centred_on_its_own_controls(tmp_path):
    rng = np.random.default_rng(0)
    parts = []
    for plate, shift in (("P1", 0.0), ("P2", 50.0)):
        n = 40
        parts.append(
            pd.DataFrame(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Well": [f"W{i}" for i in range(n)],
                    "Metadata_treatment": ["DMSO"] * 20 + ["X"] * 20,
                    "Cells_a": rng.normal(shift, 2.0, n),
                    "Cells_b": rng.normal(-shift, 1.0, n),
                }
            )
        )
    t = ProfileTable(pd.concat(parts, ignore_index=True), ["Cells_a", "Cells_b"])
    out = normalize_plates(t, "Metadata_treatment == 'DMSO'", "mad_robustize").frame
    ctrl = out[out.Metadata_treatment == "DMSO"]
    med = ctrl.groupby("Metadata_Plate")[["Cells_a", "Cells_b"]].median()
    np.testing.assert_allclose(med.to_numpy(), 0.0, atol=1e-9)
    mad = ctrl.groupby("Metadata_Plate")[["Cells_a", "Cells_b"]].agg(
        lambda x: (x - x.median()).abs().median() * 1.4826
    )
    np.testing.assert_allclose(mad.to_numpy(), 1.0, rtol=1e-6)
    assert list(out.Metadata_Well) == list(t.frame.Metadata_Well)  # input order kept


def test_zero_variance_features_are_dropped_and_all_constant_refused(tmp_path):
    df = _tiny().assign(Cells_const=3.0)
    t = build_profiles(
        ProfileTable(df, ["Cells_x", "Cells_y", "Cells_const"]),
        ["Metadata_Plate", "Metadata_Well"],
        method="none",
    )
    assert t.features == ["Cells_x", "Cells_y"]
    assert any("constant feature" in n and "Cells_const" in n for n in t.notes)
    flat = df.assign(Cells_x=1.0, Cells_y=2.0)
    with pytest.raises(UserError, match="every one of the 3 features is constant"):
        build_profiles(
            ProfileTable(flat, ["Cells_x", "Cells_y", "Cells_const"]),
            ["Metadata_Plate", "Metadata_Well"],
            method="none",
        )


def test_no_spread_among_controls_drops_the_feature_instead_of_dividing_by_zero():
    df = _tiny()
    df.loc[df.Metadata_treatment == "DMSO", "Cells_y"] = 0.5
    t = normalize_plates(
        ProfileTable(df, ["Cells_x", "Cells_y"]), "Metadata_treatment == 'DMSO'", "mad_robustize"
    )
    assert t.features == ["Cells_x"] and np.isfinite(t.matrix()).all()


def test_nan_features_are_one_line_naming_the_feature_and_well(tmp_path, capsys):
    df = _tiny()
    df.loc[3, "Cells_y"] = np.nan
    f = tmp_path / "nan.csv"
    df.to_csv(f, index=False)
    with pytest.raises(UserError, match=r"'Cells_y' has 1 NaN.*Metadata_Well=A04"):
        make_profiles(_settings(tmp_path, f))
    rc = main(
        [
            "profile",
            "--input",
            str(f),
            "--out",
            str(tmp_path / "o"),
            "--treatment",
            "Metadata_treatment",
            "--normalize",
            "none",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Cells_y" in err and "\n" not in err


def test_missing_treatment_or_input_is_one_line(tmp_path, capsys):
    f = tmp_path / "tiny.csv"
    _tiny().to_csv(f, index=False)
    assert main(["profile", "--input", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "profile.treatment" in capsys.readouterr().err
    assert (
        main(
            [
                "profile",
                "--input",
                str(tmp_path / "nope.csv"),
                "--out",
                str(tmp_path / "o"),
                "--no-metrics",
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    with pytest.raises(UserError, match="no column 'Metadata_moa'"):
        make_profiles(_settings(tmp_path, f, annotations=("Metadata_moa",)))


def test_per_cell_rows_are_aggregated_to_well_medians_or_means(tmp_path):
    rng = np.random.default_rng(1)
    wells = rng.choice(["A01", "A02", "B01"], 90)
    cells = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": wells,
            "Cells_a": rng.normal(size=90),
            "Cells_b": rng.normal(size=90),
        }
    )
    cells["Metadata_treatment"] = cells.Metadata_Well.map(
        {"A01": "DMSO", "A02": "DMSO", "B01": "X"}
    )
    f = tmp_path / "cells.parquet"
    cells.to_parquet(f)
    for op in ("median", "mean"):
        t = build_profiles(read_input(f), ["Metadata_Plate", "Metadata_Well"], op, method="none")
        want = cells.groupby("Metadata_Well")[["Cells_a", "Cells_b"]].agg(op)
        np.testing.assert_allclose(t.frame[["Cells_a", "Cells_b"]].to_numpy(), want.to_numpy())
        assert list(t.frame.Metadata_treatment) == ["DMSO", "DMSO", "X"]
        counts = cells.Metadata_Well.value_counts().sort_index()
        assert list(t.frame.Metadata_Count_Cells) == list(counts)


@pytest.mark.skipif(
    not LINCS.is_file(),
    reason=f"real LINCS profiles not found at {LINCS} (set "
    "RAYCELL_SHARED_DATA to the shared data folder)",
)
def test_lincs_plate_reproduces_copairs_run_directly(tmp_path):
    """raycell's activity mAP per compound and fraction retrieved equal copairs' own recipe."""
    from copairs import map as cmap

    df = pd.read_csv(LINCS)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    # copairs' phenotypic-activity recipe, written out here independently of raycell
    meta = df[["Metadata_broad_sample"]].copy()
    meta["Metadata_reference_index"] = np.where(df.Metadata_broad_sample == "DMSO", df.index, -1)
    cols = ["Metadata_broad_sample", "Metadata_reference_index"]
    ap = cmap.average_precision(
        meta,
        df[feats].to_numpy(),
        pos_sameby=cols,
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=cols,
        progress_bar=False,
    )
    ap = ap[ap.Metadata_broad_sample != "DMSO"]
    ref = cmap.mean_average_precision(
        ap, ["Metadata_broad_sample"], null_size=10000, threshold=0.05, seed=0, progress_bar=False
    )
    ref = ref.set_index("Metadata_broad_sample")

    s = ProfileSettings(
        input=str(LINCS),
        out=str(tmp_path / "lincs"),
        controls=DMSO,
        normalize="none",
        feature_select=(),
        treatment=("Metadata_broad_sample",),
        annotations=("Metadata_moa",),
    )
    res = profile(s)
    got = pd.read_csv(tmp_path / "lincs" / "activity_map.csv").set_index("treatment")
    assert sorted(got.index) == sorted(ref.index) and len(got) == 58
    np.testing.assert_allclose(
        got["mean_average_precision"], ref.loc[got.index, "mean_average_precision"], atol=1e-6
    )
    np.testing.assert_allclose(
        got["corrected_p_value"], ref.loc[got.index, "corrected_p_value"], atol=1e-12
    )
    frac = float((ref["corrected_p_value"] < 0.05).mean())
    assert res["retrieval"]["activity"]["fraction_retrieved"] == pytest.approx(frac)
    assert list(got["retrieved"]) == list(ref.loc[got.index, "below_corrected_p"])
    # the same numbers from `raycell evaluate --profiles` on the written profiles
    rc = main(
        [
            "evaluate",
            "--profiles",
            str(tmp_path / "lincs"),
            "--out",
            str(tmp_path / "ev"),
            "--set",
            f"profile.controls={DMSO}",
            "--set",
            "profile.treatment=[Metadata_broad_sample]",
        ]
    )
    assert rc == 0
    again = pd.read_csv(tmp_path / "ev" / "activity_map.csv").set_index("treatment")
    np.testing.assert_allclose(
        again["mean_average_precision"], got.loc[again.index, "mean_average_precision"], atol=1e-12
    )


def test_activity_needs_controls():
    t = ProfileTable(_tiny(), ["Cells_x", "Cells_y"])
    with pytest.raises(UserError, match="needs control wells"):
        activity_map(t, RetrievalSettings(treatment=["Metadata_treatment"], controls_mask=None))
    assert control_mask(t.frame, "").all()


def test_report_of_a_profile_folder_lists_treatments_sorted_and_marks_retrieved(tmp_path):
    from raycell.report import build_report

    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):  # DMSO around 0, "strong" far off in its own direction, "weak" like DMSO
        rows.append(("DMSO", rng.normal(0, 1, 4)))
    for i in range(4):
        rows.append(("strong", np.array([8.0, 8.0, 0, 0]) + rng.normal(0, 0.3, 4)))
        rows.append(("weak", rng.normal(0, 1, 4)))
    df = pd.DataFrame([r[1] for r in rows], columns=[f"Cells_f{j}" for j in range(4)])
    df.insert(0, "Metadata_treatment", [r[0] for r in rows])
    df.insert(0, "Metadata_Well", [f"W{i:02d}" for i in range(len(df))])
    df.insert(0, "Metadata_Plate", "P1")
    f = tmp_path / "wells.parquet"
    df.to_parquet(f)
    profile(_settings(tmp_path, f))
    act = pd.read_csv(tmp_path / "out" / "activity_map.csv")
    assert list(act.treatment) == ["strong", "weak"]
    assert list(act.retrieved) == [True, False]
    page = build_report(tmp_path / "out").read_text()
    assert "Phenotypic activity: mAP per treatment" in page and "✓" in page
    assert page.index(">strong<") < page.index(">weak<")


def _plates_with_shift(shift: float = 6.0) -> ProfileTable:
    """Two plates, each with 8 DMSO and 4 wells each of X and Y; plate 2 offset by `shift`."""
    rng = np.random.default_rng(3)
    rows = []
    for p, off in (("P1", 0.0), ("P2", shift)):
        for i in range(16):
            trt = "DMSO" if i < 8 else ("X" if i < 12 else "Y")
            v = rng.normal(0, 1, 6) + off
            if trt == "X":
                v[:3] += 4.0
            if trt == "Y":
                v[3:] += 4.0
            rows.append([p, f"{p}_{i:02d}", trt, *v])
    cols = ["Metadata_Plate", "Metadata_Well", "Metadata_treatment"]
    cols += [f"Cells_f{j}" for j in range(6)]
    return ProfileTable(pd.DataFrame(rows, columns=cols), cols[3:])


def test_corrections_compared_on_the_same_wells_control_and_harmony_mix_the_plates():
    from raycell.profiling.correction import compare_corrections, corrected_versions

    t = _plates_with_shift()
    ctrl = "Metadata_treatment == 'DMSO'"
    versions = corrected_versions(t, ctrl, "Metadata_Plate")
    assert list(versions) == ["raw", "control", "harmony", "control+harmony"]
    assert {len(v.frame) for v in versions.values()} == {32}
    s = RetrievalSettings(treatment=["Metadata_treatment"], null_size=1000)
    table = compare_corrections(versions, s, ctrl, "Metadata_Plate").set_index("version")
    # raw profiles separate the plates; centring each plate on its controls mixes them
    assert table.loc["raw", "batch_silhouette"] < 0.5 < table.loc["control", "batch_silhouette"]
    assert table.loc["harmony", "ilisi_norm"] > table.loc["raw", "ilisi_norm"]
    assert (table["activity_fraction_retrieved"] == 1.0).all()  # X and Y stand out in every version


def test_profile_writes_the_comparison_table(tmp_path):
    f = tmp_path / "plates.parquet"
    _plates_with_shift().frame.to_parquet(f)
    profile(_settings(tmp_path, f, normalize="mad_robustize", compare=("raw", "control")))
    cmp = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert list(cmp.version) == ["embedding / raw", "embedding / control"]
    assert "| version |" in (tmp_path / "out" / "comparison.md").read_text()
    from raycell.report import build_report

    page = build_report(tmp_path / "out").read_text()
    assert "Batch corrections compared" in page and "embedding / control" in page


def test_handmade_features_of_a_crop_data_set_are_profiled_per_well(tiny_data, tmp_path):
    from raycell.formats.shards import open_dataset
    from raycell.profiling.handmade import handmade_table

    t = handmade_table(tiny_data)
    meta = open_dataset(tiny_data).read_metadata()
    assert len(t.frame) == len(meta) and all(f.startswith("Cells_Hand_") for f in t.features)
    assert t.frame["Metadata_Well"].astype(str).tolist() == meta["well"].astype(str).tolist()
    wells = prepare(filter_rows(read_input(tiny_data), ""), ["Metadata_Plate", "Metadata_Well"])
    assert len(wells.frame) == meta.groupby(["plate", "well"]).ngroups


def test_cpmeasure_features_measure_the_centre_cell_with_cellprofiler_names(tiny_data):
    from raycell.features.morphology import crop_features
    from raycell.formats.shards import decode_images, open_dataset
    from raycell.profiling.handmade import cpmeasure_features, cpmeasure_table

    ds = open_dataset(tiny_data)
    t = ds.read_shard(ds.shard_paths[0], None, None).slice(0, 6)
    imgs = decode_images(t, ds.shape, ds.dtype)
    x, names = cpmeasure_features(imgs, ["a", "b", "c"][: imgs.shape[1]])
    assert x.shape == (6, len(names)) and "Cells_CPM_Area" in names
    assert "Cells_CPM_a_Intensity_MeanIntensity" in names
    # the same object as the hand-written features (the cell: the channel mean's object)
    ours, our_names = crop_features(imgs)
    area = ours[:, our_names.index("cell_area")]
    cpm = x[:, names.index("Cells_CPM_Area")]
    assert np.isfinite(area).sum() >= 3
    np.testing.assert_allclose(cpm[np.isfinite(area)], area[np.isfinite(area)])
    table = cpmeasure_table(tiny_data, where="Metadata_Split == 'val'")
    meta = ds.read_metadata()
    assert len(table.frame) == int((meta["split"] == "val").sum())
    assert set(table.frame["Metadata_Split"]) == {"val"}


def test_without_controls_there_is_no_activity_and_the_manifest_says_why(tmp_path):
    f = tmp_path / "tiny.csv"
    _tiny().to_csv(f, index=False)
    res = profile(_settings(tmp_path, f, controls=""))
    out = tmp_path / "out"
    assert not (out / "activity_map.csv").exists()
    assert "activity" not in json.loads((out / "retrieval.json").read_text())
    notes = json.loads((out / "profile.json").read_text())["notes"]
    assert any("no activity mAP" in n for n in notes)
    assert res["retrieval"]["percent_replicating"] is not None


def test_pycytominer_does_not_switch_pandas_copy_on_write_for_the_process():
    """pycytominer turns copy-on-write on at import; raycell imports it without that side effect."""
    import subprocess
    import sys

    code = (
        "import pandas as pd; from raycell.profiling.wellprofiles import _pycytominer; "
        "m = _pycytominer(); assert hasattr(m, 'normalize'); print(pd.options.mode.copy_on_write)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "False"


def _embeddings_folder(tmp_path, n=300, dim=6, shards=3):
    """A `raycell embed`-layout folder (list layout, morph columns, nulls in one metadata column)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    folder = tmp_path / "emb"
    (folder / "shards").mkdir(parents=True)
    wells = rng.choice(["A01", "A02", "B01", "B02"], n)
    plates = rng.choice(["P1", "P2"], n)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    frame = pd.DataFrame(
        {
            "Metadata_Plate": plates,
            "Metadata_Well": wells,
            "Metadata_treatment": np.where(np.isin(wells, ["A01", "A02"]), "DMSO", "X"),
            "Metadata_Split": rng.choice(["train", "unseen"], n),
            "Metadata_note": np.where(rng.random(n) < 0.5, None, "n"),
            "morph_area": rng.normal(100, 10, n),
        }
    )
    for i, part in enumerate(np.array_split(np.arange(n), shards)):
        t = pa.Table.from_pandas(frame.iloc[part], preserve_index=False)
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb[part].ravel()), dim)
        pq.write_table(t.append_column("embedding", col), folder / f"shards/part-{i:05d}.parquet")
    manifest = {"layout": "list", "n_cells": n, "features": ["embedding"], "heads": {}}
    (folder / "embeddings.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.ray
def test_streamed_aggregation_equals_the_in_memory_one(ray_local, tmp_path):
    """Ray Data's per-well reduction gives the in-memory aggregate's values, counts and metadata."""
    from raycell.profiling import streamed
    from raycell.profiling.streamed import streamed_table
    from raycell.profiling.wellprofiles import aggregate, filter_rows

    folder = _embeddings_folder(tmp_path)
    strata = ["Metadata_Plate", "Metadata_Well"]
    for feature_set, op, where in [
        ("embedding", "median", ""),
        ("all", "mean", "Metadata_Split == 'unseen'"),
    ]:
        mem = aggregate(filter_rows(read_input(folder, feature_set), where), strata, op)
        got = streamed_table(streamed.scan(folder), feature_set, strata, op, where)
        assert got.features == mem.features
        np.testing.assert_allclose(got.matrix(), mem.matrix(), rtol=1e-6, atol=1e-6)
        for c in strata + ["Metadata_treatment", "Metadata_Count_Cells"]:
            assert list(got.frame[c]) == list(mem.frame[c]), c
        # a column varying within a well is left out by both; constant ones are kept by both
        assert "Metadata_note" not in got.frame.columns and "Metadata_note" not in mem.frame
        assert ("Metadata_Split" in got.frame.columns) == ("Metadata_Split" in mem.frame.columns)


def test_engine_choice_follows_the_input_size_and_refuses_what_cannot_stream(tmp_path, monkeypatch):
    from raycell.profiling import streamed

    folder = _embeddings_folder(tmp_path, n=40, dim=4, shards=1)
    src = streamed.source("auto", folder)
    assert src.estimated_bytes == 40 * 4 * 8
    assert not streamed.use_ray("auto", src, "embedding")
    monkeypatch.setattr(streamed, "_available_bytes", lambda: 1000)  # a machine with 1 kB free
    assert streamed.use_ray("auto", src, "embedding")
    assert not streamed.use_ray("auto", src, "handmade")  # computed from crops: in memory
    assert streamed.source("memory", folder) is None
    assert not streamed.use_ray("memory", None, "embedding")
    with pytest.raises(ProfileError, match="profile.engine=ray streams per-cell features"):
        streamed.use_ray("ray", src, "cpmeasure")
    csv = tmp_path / "cells.csv"
    _tiny().to_csv(csv, index=False)
    assert streamed.source("auto", csv) is None  # CSV is read in memory
    with pytest.raises(ProfileError, match="reads parquet.*profile.engine=memory for CSV"):
        streamed.source("ray", csv)


def test_profile_keys_are_checked_by_the_config_loader():
    """`profile.*` choices and bounds are refused when the config loads, each in one line."""
    from raycell.config import load_config
    from raycell.errors import ConfigError

    for override, message in (
        ("profile.engine=spark", "profile.engine must be auto, memory or ray, got 'spark'"),
        ("profile.aggregate=mode", "profile.aggregate must be median or mean, got 'mode'"),
        ("profile.compare=[combat]", "profile.compare: unknown correction 'combat'"),
        ("profile.feature_select=[pca]", "profile.feature_select: unknown operation 'pca'"),
        ("profile.compare_features=[deep]", "profile.compare_features: unknown feature set"),
        ("profile.strata=[]", "profile.strata is empty"),
        ("profile.fdr=1.5", "profile.fdr must be between 0 and 1, got 1.5"),
        ("profile.null_size=10", "profile.null_size must be >= 100, got 10"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="profile.compare scores each version"):
        load_config(None, ["profile.compare=[raw]", "profile.metrics=false"])


@pytest.mark.ray
def test_profile_cli_streams_with_engine_ray(ray_local, tmp_path, capsys):
    """`raycell profile --set profile.engine=ray`: same well profiles as the in-memory engine."""
    folder = _embeddings_folder(tmp_path)
    outs = {}
    for engine in ("memory", "ray"):
        out = tmp_path / f"prof_{engine}"
        args = ["profile", "--input", str(folder), "--out", str(out)]
        args += [
            "--set",
            f"profile.engine={engine}",
            "--set",
            "profile.controls=Metadata_treatment == 'DMSO'",
        ]
        args += ["--set", "profile.metrics=false"]
        assert main(args) == 0, capsys.readouterr().err
        outs[engine] = pd.read_parquet(out / "profiles.parquet")
    a, b = outs["memory"], outs["ray"]
    assert list(a.columns) == list(b.columns)
    feats = [c for c in a.columns if c.startswith("Cells_")]
    np.testing.assert_allclose(a[feats].to_numpy(), b[feats].to_numpy(), rtol=1e-5, atol=1e-5)
