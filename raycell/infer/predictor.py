"""`CropPredictor`: loads a checkpoint once per Ray Data actor and maps Arrow batches to predictions.

Output columns (SPEC "Inference outputs"): cell_id and metadata, `latent` (fixed-size list of float32),
`prob`, `pred`, per-cell `recon_mse` / `recon_ssim`, `latent_re` / `batch_prob` for models that produce
them, and optionally `recon` (the reconstruction as uint8/uint16 bytes in the crop format).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raycell import constants as K
from raycell.data.shards import decode_images, encode_images
from raycell.losses import label_prob

PASSTHROUGH = [K.CELL_ID, K.BATCH, K.PLATE, K.WELL, K.FIELD, K.GROUP, K.LABEL, K.SPLIT, K.SOURCE,
               K.CENTROID_Y, K.CENTROID_X]


def _fixed_list(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


class CropPredictor:
    """Callable class for `Dataset.map_batches(..., batch_format='pyarrow')`."""

    def __init__(self, checkpoint: str, device: str = "auto", write_recon: bool = False,
                 z_source: str = "", passthrough: list[str] | None = None):
        from raycell.train.checkpoint import load_checkpoint

        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        self.device = torch.device(dev)
        self.model, self.meta = load_checkpoint(checkpoint, self.device)
        self.spec = self.meta["data_spec_obj"]
        self.labels = self.meta["labels_obj"]
        self.batches = self.meta["batches_obj"]
        self.write_recon = write_recon
        self.passthrough = passthrough or PASSTHROUGH

    def design_matrix(self, t: pa.Table) -> torch.Tensor:
        """One-hot Z for batches seen in training; unseen batches get zeros (random-effects models need an
        inferred Z for those, see `raycell infer-z`)."""
        b = torch.from_numpy(self.batches.encode(t.column(K.BATCH), allow_unknown=True))
        z = torch.zeros(len(b), len(self.batches))
        ok = b >= 0
        z[ok, b[ok]] = 1.0
        return z

    @torch.inference_mode()
    def __call__(self, t: pa.Table) -> pa.Table:
        """Predict one batch of rows."""
        from raycell.eval.metrics import per_cell_mse, per_cell_ssim

        imgs = decode_images(t, self.spec.shape, self.spec.dtype)
        x = self.spec.to_float(torch.from_numpy(imgs.astype(np.float32)).to(self.device))
        z = self.design_matrix(t).to(self.device)
        out = self.model(x, z)
        prob = label_prob(out["logits"]).float().cpu().numpy()
        xs = x.cpu().numpy()
        rec = out["recon"].float().clamp(0, 1).cpu().numpy()
        cols = {c: t.column(c) for c in self.passthrough if c in t.column_names}
        cols[K.LATENT] = _fixed_list(out["latent"].float().cpu().numpy())
        if prob.ndim == 1:
            cols[K.PROB] = pa.array(prob, pa.float32())
            pred = (prob >= 0.5).astype(np.int64)
        else:
            cols[K.PROB] = _fixed_list(prob)
            pred = prob.argmax(1)
        cols[K.PRED] = pa.array(self.labels.decode(pred).astype(str))
        cols[K.RECON_MSE] = pa.array(per_cell_mse(xs, rec), pa.float32())
        cols[K.RECON_SSIM] = pa.array(per_cell_ssim(xs, rec, data_range=1.0), pa.float32())
        if "latent_re" in out:
            cols[K.LATENT_RE] = _fixed_list(out["latent_re"].float().cpu().numpy())
        if "batch_logits" in out:
            cols[K.BATCH_PROB] = _fixed_list(torch.softmax(out["batch_logits"].float(), 1).cpu().numpy())
        if self.write_recon:
            top = 255.0 if self.spec.dtype == "uint8" else 65535.0
            q = np.rint(rec * top).astype(np.uint8 if self.spec.dtype == "uint8" else np.uint16)
            cols[K.RECON] = encode_images(q)
        return pa.table(cols)
