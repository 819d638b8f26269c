"""`CropPredictor`: loads a checkpoint once per Ray Data actor and maps Arrow batches to predictions.

Two layouts of the same forward pass:

* `predictions` (`raycell infer`, SPEC "Inference outputs"): cell_id and metadata, `latent` (fixed-size
  list of float32), `prob`, `pred`, per-cell `recon_mse` / `recon_ssim` for models that reconstruct,
  `latent_re` / `batch_prob` for models that produce them, `prob_<head>` / `pred_<head>` per weak-label
  head, and optionally `recon` (the reconstruction as uint8/uint16 bytes in the crop format);
* `profiles` (`raycell embed`): the profiling ecosystem's layout (CytoTable, pycytominer, copairs):
  `Metadata_Plate`, `Metadata_Well`, `Metadata_Site`, `Metadata_ObjectNumber`, `Metadata_<column>` for
  every other metadata column, the `morph_*` features unchanged, `Pred_<head>` / `Prob_<head>`, then the
  embedding as `Cells_Embedding_XXXX` float32 columns (or one `embedding` list column).
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raycell import constants as K
from raycell.errors import UserError
from raycell.formats.categories import CategoryMap
from raycell.formats.embeddings import EMBEDDING_PREFIX, LIST_COLUMN, PROFILE_NAMES
from raycell.formats.shards import decode_images, encode_images
from raycell.forward import ModelOutput
from raycell.losses import heads_prob, label_prob, per_cell_mse, per_cell_ssim
from raycell.models.random_effects import one_hot_design

PASSTHROUGH = [
    K.CELL_ID,
    K.BATCH,
    K.PLATE,
    K.WELL,
    K.FIELD,
    K.GROUP,
    K.LABEL,
    K.SPLIT,
    K.SOURCE,
    K.CENTROID_Y,
    K.CENTROID_X,
]


def _fixed_list(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


FEATURE_PREFIX = EMBEDDING_PREFIX
EMBEDDING = LIST_COLUMN
_NOT_METADATA = set(K.IMAGE_COLUMNS) | {"path"}  # `path`: read_parquet's include_paths, kept as is


def feature_names(dim: int) -> list[str]:
    """The embedding's feature columns in the `columns` layout."""
    return [f"{FEATURE_PREFIX}{i:04d}" for i in range(dim)]


def object_numbers(cell_ids: pa.ChunkedArray | pa.Array) -> pa.Array:
    """`Metadata_ObjectNumber`: the trailing number of each cell_id (ingest's `<field>-c00012` is object
    12 of its field, as CellProfiler numbers them), -1 where the id ends in no digits (one Arrow regex
    over the batch, no per-row Python).
    """
    digits = pc.struct_field(pc.extract_regex(pc.cast(cell_ids, pa.string()), r"(?P<n>\d+)$"), [0])
    return pc.fill_null(pc.cast(digits, pa.int64()), -1)


class MissingDesignMatrixError(UserError, ValueError):
    """A random/mixed-effects model was asked to predict cells of a batch it has no Z row for."""


def _stable_choice(cell_ids: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    """A pseudo-random integer in [0, n) per cell, fixed by its cell_id.

    CRC32 of the id, then a multiplicative hash to spread consecutive ids.
    """
    h = np.array([zlib.crc32(str(c).encode()) for c in cell_ids.to_pylist()], dtype=np.uint64)
    return ((h * np.uint64(2654435761)) % np.uint64(2**32) % np.uint64(n)).astype(np.int64)


class CropPredictor:
    """Callable class for `Dataset.map_batches(..., batch_format='pyarrow')`."""

    def __init__(
        self,
        checkpoint: str,
        device: str = "auto",
        write_recon: bool = False,
        z_source: str = "",
        passthrough: list[str] | None = None,
        randomize_z: bool = False,
        layout: str = "predictions",
        feature_layout: str = "columns",
        channels_last: bool = True,
    ):
        """Load the checkpoint (and the inferred Z, if any) once per actor.

        Args:
            checkpoint: Checkpoint folder or run folder.
            device: 'auto' (CUDA when available), 'cpu' or 'cuda[:i]'.
            write_recon: Also return the reconstructions as crop bytes.
            z_source: Output of `raycell infer-z` (folder or .parquet): a soft Z per cell_id, used
                for cells whose batch is not one of the model's training batches.
            passthrough: Input columns copied to the output.
            randomize_z: Ablation (the reference's --randomize_batch): every cell gets a random
                one-hot Z row, fixed per cell_id so that re-runs and different actors agree.
            layout: 'predictions' (`raycell infer`) or 'profiles' (`raycell embed`; see the module doc).
            feature_layout: profiles: 'columns' (one float32 column per feature) or 'list' (one
                fixed-size list column `embedding`).
            channels_last: run the model in channels-last memory format (`train.channels_last`):
                the small AEC's inference forward on CPU is 1.7x faster (bench/bench_cpu_choices.py).
        """
        from raycell.models.checkpoint import load_checkpoint
        from raycell.models.registry import model_entry

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.meta = load_checkpoint(checkpoint, self.device)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.entry = model_entry(self.meta.model_type)  # what the model needs (Z) and outputs
        self.spec = self.meta.data_spec
        self.labels = self.meta.labels
        self.batch_map = self.meta.batches  # the training batches: the columns of Z
        self.write_recon = write_recon
        self.passthrough = passthrough or PASSTHROUGH
        self.randomize_z = randomize_z
        self.layout, self.feature_layout = layout, feature_layout
        # the heads: weak-label columns, or the one phenotype head of the AECs
        self.heads = self.meta.heads or None
        self.z_ids: pa.Array | None = None
        self.z_values: np.ndarray | None = None
        self._empty_schema: pa.Schema | None = None
        if z_source:
            from raycell.formats.inferred_z import read_inferred_z

            self.z_ids, self.z_values = read_inferred_z(z_source, list(self.batch_map.values))

    def variant(
        self, z_source: str = "", randomize_z: bool = False, write_recon: bool = False
    ) -> CropPredictor:
        """The same loaded model with other Z and output settings (the model is shared, not copied).

        Why: one Ray Data pass can serve several outputs of one checkpoint (its inferred Z, randomized
        Z, Z made another way) without loading the checkpoint once per output.
        """
        other = copy.copy(self)
        other.write_recon, other.randomize_z = write_recon, randomize_z
        other.z_ids, other.z_values, other._empty_schema = None, None, None
        if z_source:
            from raycell.formats.inferred_z import read_inferred_z

            other.z_ids, other.z_values = read_inferred_z(z_source, list(self.batch_map.values))
        return other

    def design_matrix(self, t: pa.Table) -> torch.Tensor:
        """The design matrix Z (N, n_training_batches) for a batch of rows.

        Seen batches get their one-hot row. Cells of other batches get their row of the inferred
        soft Z (`z_source`) when one is given; otherwise zeros, which random- and mixed-effects
        models refuse (their random effects would silently vanish), raising
        `MissingDesignMatrixError`. Conventional and adversarial models ignore Z. `randomize_z`
        replaces every row by a random one-hot row.
        """
        n = len(self.batch_map)
        if self.randomize_z:
            return one_hot_design(torch.from_numpy(_stable_choice(t.column(K.CELL_ID), n)), n)
        b = torch.from_numpy(self.batch_map.encode(t.column(K.BATCH), allow_unknown=True))
        z = one_hot_design(b, n)
        ok = b >= 0
        unknown = np.flatnonzero((~ok).numpy())
        if unknown.size == 0:
            return z
        if self.z_values is not None:
            ids = t.column(K.CELL_ID).take(pa.array(unknown))
            pos = np.asarray(
                pc.fill_null(pc.index_in(ids, value_set=self.z_ids), -1).to_numpy(
                    zero_copy_only=False
                ),
                dtype=np.int64,
            )
            if (pos < 0).any():
                raise MissingDesignMatrixError(
                    f"{int((pos < 0).sum())} cell(s) of batches outside the training batches "
                    f"(e.g. {ids[int(np.flatnonzero(pos < 0)[0])].as_py()!r}) have no row in the "
                    "inferred Z (infer.z_source); run `raycell infer-z` on these cells' splits "
                    "(infer.z_splits)"
                )
            z[torch.from_numpy(unknown)] = torch.from_numpy(self.z_values[pos])
        elif self.entry.uses_z:
            missing = sorted(set(t.column(K.BATCH).take(pa.array(unknown)).to_pylist()))
            raise MissingDesignMatrixError(
                f"model type {self.meta.model_type!r} needs a design matrix Z for every cell, "
                f"but batch(es) {missing} are not among its training batches "
                f"{list(self.batch_map.values)} and no inferred Z was given: run `raycell infer-z` "
                "to predict a soft Z for them and pass its output folder as infer.z_source (or set "
                "infer.randomize_z=true for the ablation)"
            )
        return z

    @torch.inference_mode()
    def __call__(self, t: pa.Table) -> pa.Table:
        """Predict one batch of rows.

        An empty batch (a block with no rows of the requested splits) never reaches the model: some
        layers (instance norm in the random-effects networks) fail on zero rows. It gets an empty
        table with the columns a non-empty batch would have, so Ray Data's blocks share one schema.
        """
        if t.num_rows == 0:
            return self._empty_output(t)
        # decode errors name the row's input file when read_parquet's path column is passed through
        return self.predict_decoded(t, decode_images(t, self.spec.shape, self.spec.dtype))

    @torch.inference_mode()
    def predict_decoded(self, t: pa.Table, imgs: np.ndarray) -> pa.Table:
        """Predict rows whose crops are already decoded (`imgs`, as `decode_images` gives them)."""
        if t.num_rows == 0:
            return self._empty_output(t)
        return self._predict(t, imgs, self.design_matrix(t))

    def _empty_output(self, t: pa.Table) -> pa.Table:
        """Zero rows with the output schema (computed once, from one blank crop that is thrown away)."""
        if self.layout == "profiles":  # the metadata columns come from the input: one row of nulls
            blank = np.zeros((1, *self.spec.shape), self.spec.dtype)
            row = pa.table({f.name: pa.nulls(1, f.type) for f in t.schema})
            return self._predict(row, blank, torch.zeros(1, len(self.batch_map))).slice(0, 0)
        if self._empty_schema is None:
            blank = np.zeros((1, *self.spec.shape), self.spec.dtype)
            one = self._predict(pa.table({}), blank, torch.zeros(1, len(self.batch_map)))
            self._empty_schema = one.schema
        cols = {c: t.column(c) for c in self.passthrough if c in t.column_names}
        for f in self._empty_schema:
            cols[f.name] = pa.array([], f.type)
        return pa.table(cols)

    def head_probs(self, out: ModelOutput) -> list[tuple[CategoryMap, np.ndarray]]:
        """(head, (N, K) class probabilities) per head; the AECs' single head is the label column."""
        if self.heads:
            return list(
                zip(
                    self.heads,
                    [
                        p.float().cpu().numpy()
                        for p in heads_prob(out.logits, [len(h) for h in self.heads])
                    ],
                )
            )
        p = label_prob(out.logits).float().cpu().numpy()
        return [(self.labels, np.stack([1 - p, p], 1) if p.ndim == 1 else p)]

    def _profiles(self, t: pa.Table, out: ModelOutput) -> pa.Table:
        """The `profiles` layout (module docstring) for one batch of rows."""
        meta = [
            c for c in t.column_names if c not in _NOT_METADATA and not c.startswith(K.MORPH_PREFIX)
        ]
        cols: dict[str, pa.Array] = {}
        for c in (K.PLATE, K.WELL, K.FIELD):
            if c in t.column_names:
                cols[PROFILE_NAMES[c]] = t.column(c)
        if K.CELL_ID in t.column_names:
            cols["Metadata_ObjectNumber"] = object_numbers(t.column(K.CELL_ID))
        for c in meta:
            if c not in (K.PLATE, K.WELL, K.FIELD):
                cols[PROFILE_NAMES.get(c, f"Metadata_{c}")] = t.column(c)
        for c in t.column_names:
            if c.startswith(K.MORPH_PREFIX):
                cols[c] = t.column(c)
        for head, p in self.head_probs(out):
            cols[f"Pred_{head.column}"] = pa.array(head.decode(p.argmax(1)).astype(str))
            cols[f"Prob_{head.column}"] = _fixed_list(p)
        z = np.ascontiguousarray(out.latent.float().cpu().numpy(), dtype=np.float32)
        if self.feature_layout == "list":
            cols[EMBEDDING] = _fixed_list(z)
        else:
            cols.update({n: pa.array(z[:, i]) for i, n in enumerate(feature_names(z.shape[1]))})
        if "path" in t.column_names:
            cols["path"] = t.column("path")
        return pa.table(cols)

    def _predict(self, t: pa.Table, imgs: np.ndarray, z: torch.Tensor) -> pa.Table:
        # integers to the device (4x less to copy than float32), scaled there, as in training: the
        # checkpoint's spec normalises as the model was trained (data.normalize), so recon_mse/ssim and
        # written reconstructions are in that normalised intensity space
        raw = imgs.astype(np.int32) if imgs.dtype == np.uint16 else imgs.copy()
        x = self.spec.to_float(torch.from_numpy(raw).to(self.device))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out: ModelOutput = self.model(x, z.to(self.device))
        if self.layout == "profiles":
            return self._profiles(t, out)
        cols = {c: t.column(c) for c in self.passthrough if c in t.column_names}
        cols[K.LATENT] = _fixed_list(out.latent.float().cpu().numpy())
        if self.heads:  # weak-label heads; prob/pred are the label column's head when it is one
            for head, p in self.head_probs(out):
                cols[f"{K.PROB}_{head.column}"] = _fixed_list(p)
                cols[f"{K.PRED}_{head.column}"] = pa.array(head.decode(p.argmax(1)).astype(str))
                if head.column == K.LABEL:
                    cols[K.PROB] = (
                        pa.array(p[:, 1], pa.float32()) if p.shape[1] == 2 else _fixed_list(p)
                    )
                    cols[K.PRED] = cols[f"{K.PRED}_{head.column}"]
        else:
            prob = label_prob(out.logits).float().cpu().numpy()
            if prob.ndim == 1:
                cols[K.PROB] = pa.array(prob, pa.float32())
                pred = (prob >= 0.5).astype(np.int64)
            else:
                cols[K.PROB] = _fixed_list(prob)
                pred = prob.argmax(1)
            cols[K.PRED] = pa.array(self.labels.decode(pred).astype(str))
        rec = None
        if self.entry.reconstructs:
            rec = out.recon.float().clamp(0, 1)
            # per-cell metrics where the crops already are; only (N,) values come back to the CPU
            cols[K.RECON_MSE] = pa.array(per_cell_mse(x, rec).cpu().numpy(), pa.float32())
            cols[K.RECON_SSIM] = pa.array(
                per_cell_ssim(x, rec, data_range=1.0).cpu().numpy(), pa.float32()
            )
        # columns of the optional outputs the model type declares (the same for every block)
        if "latent_re" in self.entry.outputs:
            cols[K.LATENT_RE] = _fixed_list(out.latent_re.float().cpu().numpy())
        if "batch_logits" in self.entry.outputs:
            cols[K.BATCH_PROB] = _fixed_list(
                torch.softmax(out.batch_logits.float(), 1).cpu().numpy()
            )
        if self.write_recon and rec is not None:
            top = 255.0 if self.spec.dtype == "uint8" else 65535.0
            q = np.rint(rec.cpu().numpy() * top).astype(
                np.uint8 if self.spec.dtype == "uint8" else np.uint16
            )
            cols[K.RECON] = encode_images(q)
        return pa.table(cols)
