import numpy as np
import pyarrow as pa
import pytest

from raycell.formats.categories import CategoryMap, UnknownCategoryError


def test_fit_encode_decode():
    m = CategoryMap.fit("label", ["low", "high", "low"])
    assert m.values == ("high", "low")
    codes = m.encode(["low", "high", "low"])
    assert codes.tolist() == [1, 0, 1] and codes.dtype == np.int64
    assert m.decode(codes).tolist() == ["low", "high", "low"]
    assert m.encode(pa.chunked_array([["high"], ["low"]])).tolist() == [0, 1]


def test_unknown_value_raises_naming_it():
    m = CategoryMap("batch", ("b0", "b1"))
    with pytest.raises(
        UnknownCategoryError, match=r"batch value 'b9' is not in the training vocabulary"
    ):
        m.encode(["b0", "b9"])
    assert m.encode(["b0", "b9"], allow_unknown=True).tolist() == [0, -1]


def test_round_trip_and_duplicates():
    m = CategoryMap("batch", ("x", "y"))
    assert CategoryMap.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="duplicate"):
        CategoryMap("batch", ("x", "x"))
