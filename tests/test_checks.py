"""_checks.py: the input checks every lesson's functions share; each error names the function,
what was wrong, and what was expected."""
import pytest
import torch

from minqlora._checks import check_bits, check_blocksize, check_code, check_dtype, check_float


def test_check_float():
    check_float(torch.ones(3, dtype=torch.bfloat16), "f")
    check_float(torch.empty(0), "f")
    with pytest.raises(TypeError, match="f: expected a torch.Tensor, got list"):
        check_float([1.0], "f")
    with pytest.raises(TypeError, match="f: expected a floating-point tensor .* got torch.int64"):
        check_float(torch.ones(3, dtype=torch.long), "f")
    with pytest.raises(ValueError, match=r"f: input has 3 non-finite value\(s\) \(1 NaN, 2 Inf\) "
                                         r"out of 4"):
        check_float(torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]), "f")


def test_check_dtype():
    for ok in (None, torch.float32, torch.bfloat16, torch.float64):
        check_dtype(ok, "f")
    for bad in (torch.int32, torch.bool, "float32"):
        with pytest.raises(TypeError, match=f"f: dtype must be a floating-point dtype, got {bad}"):
            check_dtype(bad, "f")


@pytest.mark.parametrize("blocksize", [2, 4, 64, 4096, 2**20])
def test_check_blocksize_accepts_powers_of_two(blocksize):
    check_blocksize(blocksize, "f")


@pytest.mark.parametrize("blocksize", [0, 1, 3, 48, -64, 64.0, True, "64", None])
def test_check_blocksize_refuses_the_rest(blocksize):
    with pytest.raises(ValueError, match="f: blocksize must be a power of two >= 2, got "):
        check_blocksize(blocksize, "f")
    with pytest.raises(ValueError, match="f: state2.blocksize must be"):
        check_blocksize(blocksize, "f", "state2.blocksize")


def test_check_bits():
    check_bits(2, "f"), check_bits(16, "f")
    for bad in (1, 17, 4.0):
        with pytest.raises(ValueError, match=f"f: bits must be an integer from 2 to 16, got {bad}"):
            check_bits(bad, "f")


def test_check_code():
    check_code(torch.tensor([-1.0, 0.0, 1.0]), "f")
    check_code(torch.tensor([0.0, 1.0, -1.0, -0.0]), "f", most=16, increasing=False)  # bit order
    cases = [(torch.tensor([1.0, 0.0]), "strictly increasing"),
             (torch.tensor([0.0, 2.0]), r"values must lie in \[-1, 1\], got range \[0.0, 2.0\]"),
             (torch.tensor([0.0, float("nan")]), r"\[-1, 1\]"),
             (torch.tensor([0.5]), "2 to 256 entries"),
             (torch.linspace(-1, 1, 257), "2 to 256 entries .*, got 257"),
             (torch.tensor([0, 1]), "1-D floating-point")]
    for code, message in cases:
        with pytest.raises(ValueError, match="f: code .*" + message):
            check_code(code, "f")
    with pytest.raises(ValueError, match="2 to 16 entries"):
        check_code(torch.linspace(-1, 1, 17), "f", most=16, increasing=False)
