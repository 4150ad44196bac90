import gzip

import numpy as np
import pytest

from pomq_deploy.data.idx import read_idx, write_idx
from pomq_deploy.errors import DataError


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_roundtrip(tmp_path, name):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, data)
    out = read_idx(tmp_path / name)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, data)


def test_header_bytes_by_hand(tmp_path):
    # magic 00 00 08 01 (ubyte, 1 dim), length 3, then the bytes
    (tmp_path / "l").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    np.testing.assert_array_equal(read_idx(tmp_path / "l"), [7, 8, 9])


@pytest.mark.parametrize(
    "raw, message",
    [
        (bytes([0, 0, 9, 1, 0, 0, 0, 1, 5]), "bad magic"),  # type code 9 is signed bytes
        (bytes([0, 0, 8, 2, 0, 0, 0, 2]), "truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2]), r"declares shape \(4,\) \(4 bytes\) but holds 2"),
    ],
)
def test_bad_files(tmp_path, raw, message):
    (tmp_path / "x").write_bytes(raw)
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "x")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x05abcde")[:-6])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_missing(tmp_path):
    with pytest.raises(DataError, match="no such IDX file"):
        read_idx(tmp_path / "nope")
