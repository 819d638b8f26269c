import hashlib

import numpy as np

from raycell import constants as K
from raycell.data.synthetic import generate


def test_deterministic_under_seed():
    a, ma, _ = generate(n_cells=200, crop_size=32, seed=3)
    b, mb, _ = generate(n_cells=200, crop_size=32, seed=3)
    c, _, _ = generate(n_cells=200, crop_size=32, seed=4)
    assert hashlib.sha1(a.tobytes()).digest() == hashlib.sha1(b.tobytes()).digest()
    assert ma.equals(mb)
    assert not np.array_equal(a, c)
    assert a.shape == (200, 2, 32, 32) and a.dtype == np.uint8 and len(ma) == 200


def test_ground_truth_structure():
    imgs, meta, gt = generate(n_cells=3000, crop_size=32, seed=0, confounding=0.8)
    unseen = set(gt["unseen_batches"])
    assert len(unseen) == 2
    seen = meta[~meta[K.BATCH].isin(unseen)]
    # confounded: in every seen batch one label dominates; unseen batches are balanced
    frac_low = seen.groupby(K.BATCH)[K.LABEL].apply(lambda s: (s == "low").mean())
    assert ((frac_low > 0.7) | (frac_low < 0.3)).all()
    un = (
        meta[meta[K.BATCH].isin(unseen)]
        .groupby(K.BATCH)[K.LABEL]
        .apply(lambda s: (s == "low").mean())
    )
    assert (abs(un - 0.5) < 0.05).all()
    # the phenotype is a morphology signal: low cells have more puncta and ruffled outlines on average,
    # but the classes overlap (subtle)
    low, high = meta[meta[K.LABEL] == "low"], meta[meta[K.LABEL] == "high"]
    assert low.true_puncta.mean() > high.true_puncta.mean() + 2
    assert low.true_lobe_amp.mean() > high.true_lobe_amp.mean()
    assert (high.true_puncta >= low.true_puncta.median()).mean() > 0.05
    # the shortcut: low-majority seen batches are imaged with higher gain
    bp = {b["batch"]: b for b in gt["batches"]}
    low_gain = [bp[b]["gain_cyto"] for b in bp if bp[b]["majority"] == "low"]
    high_gain = [bp[b]["gain_cyto"] for b in bp if bp[b]["majority"] == "high"]
    assert min(low_gain) > max(high_gain)
    # strong batch effects: simple per-image statistics identify the batch far above chance
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    x = imgs.astype(float)
    feats = np.c_[
        x.mean((2, 3)),
        x.std((2, 3)),
        x[:, :, :4, :4].mean((2, 3)),
        np.abs(np.diff(x, axis=3)).mean((2, 3)),
    ]
    acc = cross_val_score(LogisticRegression(max_iter=2000), feats, meta[K.BATCH], cv=3).mean()
    assert acc > 3 / len(bp)
