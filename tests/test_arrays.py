"""List columns read as matrices: one decoder, one set of refusals, wherever they are read."""

import numpy as np
import pyarrow as pa
import pytest

from raycell.formats.arrays import ListColumnError, list_matrix, object_matrix


def test_fixed_variable_and_chunked_lists_decode_alike():
    rows = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    want = np.asarray(rows, np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(want.ravel()), 2)
    chunked = pa.chunked_array([pa.array(rows[:1]), pa.array(rows[1:])])
    for col in (fixed, pa.array(rows), chunked):
        got = list_matrix(col, "latent")
        assert got.dtype == np.float32 and got.shape == (3, 2)
        np.testing.assert_array_equal(got, want)
    assert list_matrix(fixed.slice(0, 0), "latent").shape == (0, 2)


@pytest.mark.parametrize(
    "col,message",
    [
        (pa.array([[1.0], [2.0, 3.0]]), "ragged: row 0 has 1 values but row 1 has 2"),
        (pa.array([[1.0], None]), "has 1 null row"),
        (pa.array([1.0, 2.0]), "must be a list of numbers per row, got double"),
    ],
)
def test_bad_list_columns_are_refused_naming_column_and_file(col, message):
    with pytest.raises(ListColumnError, match=message) as err:
        list_matrix(col, "z", "run/inferred_z.parquet")
    assert "column 'z' in run/inferred_z.parquet" in str(err.value)


def test_object_columns_decode_or_refuse_by_name():
    np.testing.assert_array_equal(object_matrix([np.ones(2), [0, 1]]), [[1, 1], [0, 1]])
    with pytest.raises(ListColumnError, match="'Prob_dose' is not one equal-length"):
        object_matrix([np.ones(2), np.ones(3)], "Prob_dose")
