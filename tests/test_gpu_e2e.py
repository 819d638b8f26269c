"""bench/gpu_e2e.py without Ray or a GPU: FLOP counting, MFU arithmetic, history figures, summary.

The whole script (`--dry-run`) starts Ray and runs five `raycell train` commands and an embed:
minutes on the 2-core machine, so it is not run here (bench/README.md, GPU, has the command).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # the bench/ scripts, not the product: `make test-bench`

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def g():
    from bench import gpu_e2e

    return gpu_e2e


def test_peak_lookup_prefers_the_specific_name(g):
    assert g.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.5e12  # the SXM part
    assert g.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert g.peak_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert g.peak_bf16_flops("NVIDIA H200") == 989.5e12
    assert g.peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert g.peak_bf16_flops("NVIDIA L40S") == 362e12  # not taken for the L4
    assert g.peak_bf16_flops("NVIDIA GeForce GTX 1080") is None


def test_mfu_is_model_flops_rate_over_peak(g):
    # 8.2 GFLOP per image at 12,000 img/s on a 989.5 TFLOP/s part: 9.9 %
    assert g.mfu(8.2e9, 12_000, 989.5e12) == pytest.approx(8.2e9 * 12_000 / 989.5e12)
    assert g.mfu(8.2e9, 12_000, 989.5e12) == pytest.approx(0.0994, abs=1e-3)
    assert g.mfu(None, 12_000, 989.5e12) is None and g.mfu(8.2e9, None, 1e15) is None
    assert g.mfu(8.2e9, 12_000, None) is None  # an unknown GPU: no MFU rather than a wrong one


def test_epoch_figures_skip_the_warmup_epoch(g):
    hist = [
        {"epoch": 0, "steps": 10, "train_time_s": 9.0, "data_wait_s": 5.0, "epoch_time_s": 10.0},
        {
            "epoch": 1,
            "steps": 10,
            "train_time_s": 2.0,
            "data_wait_s": 0.1,
            "epoch_time_s": 2.5,
            "gpu_peak_mem_gib": 1.5,
        },
        {
            "epoch": 2,
            "steps": 10,
            "train_time_s": 2.0,
            "data_wait_s": 0.3,
            "epoch_time_s": 2.5,
            "gpu_peak_mem_gib": 1.75,
        },
    ]
    f = g.epoch_figures(hist, batch_size=256)
    assert f["epochs_used"] == 2 and f["epochs_done"] == 3 and f["steps"] == 20
    assert f["images_per_s"] == pytest.approx(20 * 256 / 4.0)
    assert f["idle_on_data"] == pytest.approx(0.4 / 4.0)
    assert f["images_per_s_compute"] == pytest.approx(20 * 256 / 3.6)
    assert f["gpu_peak_mem_gib"] == 1.75
    one = g.epoch_figures(hist[:1], batch_size=256)  # a dry run's single epoch is used as it is
    assert one["epochs_used"] == 1 and one["idle_on_data"] == pytest.approx(5 / 9)
    assert g.epoch_figures([], 256) == {"epochs_used": 0}


def test_smi_summary_reads_samples_and_skips_junk(g, tmp_path):
    p = tmp_path / "smi.csv"
    p.write_text("90, 1000\n100, 3000\n[N/A], 12\n80, 2000\n")
    s = g.smi_summary(p)
    assert s == {
        "samples": 3,
        "util_mean_pct": 90.0,
        "util_max_pct": 100.0,
        "mem_used_max_mib": 3000.0,
    }
    assert g.smi_summary(tmp_path / "absent.csv") is None


def _run(g, name, group, bf16, ips):
    c = g.Case(name, "d64", "mixedeffects", "small", 256, bf16, True, 25.0, {}, group)
    from dataclasses import asdict

    return {"case": asdict(c), "images_per_s": ips}


def test_summary_compares_precisions_and_gives_the_mixed_effects_verdict(g):
    res = {
        "runs": [
            _run(g, "a_bf16_cl", "a", True, 300.0),
            _run(g, "a_fp32", "a", False, 200.0),
            _run(g, "me_bf16", "mixedeffects_64", True, 80.0),
            _run(g, "me_fp32", "mixedeffects_64", False, 100.0),
        ]
    }
    rows = {r["group"]: r for r in g.summarise(res)}
    assert rows["a"]["speedup_bf16"] == pytest.approx(1.5) and "verdict" not in rows["a"]
    assert rows["mixedeffects_64"]["speedup_bf16"] == pytest.approx(0.8)
    assert rows["mixedeffects_64"]["verdict"].startswith("bf16 does not profit")
    res["runs"][2]["images_per_s"] = None  # the bf16 run failed: nothing decided
    rows = {r["group"]: r for r in g.summarise(res)}
    assert rows["mixedeffects_64"]["verdict"].startswith("not measured")
    res["dry_run"] = True  # a CPU has no bf16 autocast: no verdict from a dry run
    rows = {r["group"]: r for r in g.summarise(res)}
    assert rows["mixedeffects_64"]["verdict"].startswith("dry run")
    json.dumps(rows)  # the JSON holds it as is


def test_plan_covers_every_required_run(g):
    names = [c.name for c in g.plan_cases(dry=False, main_s=40, compare_s=25)]
    assert names == [  # the judged runs first: a budget that runs out skips the last ones
        "aec_small_64_bf16_cl",
        "resnet50_128_bf16_cl",
        "aec_armed_256_bf16_cl",
        "aec_small_64_fp32",
        "resnet50_128_fp32",
        "aec_armed_256_fp32",
        "mixedeffects_64_bf16_cl",
        "mixedeffects_64_fp32_cl",
    ]
    cases = {c.name: c for c in g.plan_cases(dry=False, main_s=40, compare_s=25)}
    assert g.DATASETS[cases["aec_armed_256_bf16_cl"].data][0] == 256
    assert g.DATASETS[cases["resnet50_128_fp32"].data][0] == 128
    assert cases["resnet50_128_fp32"].args == {"backbone": "resnet50", "weights": ""}  # random init
    assert not cases["aec_small_64_fp32"].bf16 and not cases["aec_small_64_fp32"].channels_last


def test_flop_count_covers_forward_and_backward(g, tiny_data):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    case = g.Case(
        "r18",
        "d32",
        "timm",
        "small",
        16,
        True,
        True,
        1.0,
        {"backbone": "resnet18", "weights": ""},
        "r18",
    )
    got = g.count_flops(case, str(tiny_data))
    assert got["image_shape"] == [2, 32, 32]
    import timm

    net = timm.create_model("resnet18", pretrained=False, in_chans=2, num_classes=2)
    with FlopCounterMode(display=False) as fc:
        net(torch.rand(4, 2, 32, 32))
    fwd = fc.get_total_flops() / 4
    # a training step: the forward, and a backward of about twice its FLOPs (the first conv's input
    # gradient is not needed, so a little under 3x)
    assert 2.7 * fwd < got["flops_per_image"] < 3.05 * fwd
    aec = g.count_flops(
        g.Case("a", "d32", "conventional", "tiny", 16, True, True, 1.0, {}, "a"), str(tiny_data)
    )
    me = g.count_flops(
        g.Case("m", "d32", "mixedeffects", "tiny", 16, True, True, 1.0, {}, "m"), str(tiny_data)
    )
    assert 0 < aec["flops_per_image"] < me["flops_per_image"]  # the ME step runs more networks
