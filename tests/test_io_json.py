"""``atomic_write_json`` writes strict JSON: a non-finite number (a diverged metric) becomes ``null``
with a warning that says where, instead of a ``NaN`` token other readers reject."""

import json
import math

import numpy as np
import pytest

from flowalign.io import atomic_write_json


def test_non_finite_values_are_written_as_null_with_a_warning_naming_them(tmp_path):
    obj = {"loss": float("nan"), "ok": 1.5, "n": 3, "flag": True,
           "history": [0.1, float("inf"), np.float32("nan"), np.float64(2.0)], "nested": {"low": -math.inf}}
    with pytest.warns(UserWarning, match=r"non-finite values written as null at /loss, /history/1, /history/2, "
                                         r"/nested/low"):
        atomic_write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back == {"loss": None, "ok": 1.5, "n": 3, "flag": True, "history": [0.1, None, None, 2.0],
                    "nested": {"low": None}}


def test_finite_objects_are_written_unchanged_and_without_a_warning(tmp_path, recwarn):
    obj = {"a": [1, 2.5, None, "x"], "b": {"c": False}}
    atomic_write_json(tmp_path / "r.json", obj)
    assert json.loads((tmp_path / "r.json").read_text()) == obj
    assert not [w for w in recwarn if "non-finite" in str(w.message)]
