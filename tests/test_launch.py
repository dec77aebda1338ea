"""launch.py: what one launch of kernels/dequant_nf4.cu needs (source, geometry, grid, the
argument list and the checks that keep the kernel inside its buffers)."""
import os

import pytest
import torch

from minqlora import launch
from minqlora.quant_state import quantize_4bit


def test_geometry_and_grid_follow_the_defines():
    """256 threads x 16 bytes = 8192 weights per block: 4096^2 -> 2048 blocks, 3 -> 1, 0 -> 0."""
    source = launch.kernel_source()
    assert launch.geometry(source) == (256, 16)
    assert [launch.grid(n, source) for n in (4096 * 4096, 8193, 3, 0)] == [
        (2048, 256), (2, 256), (1, 256), (0, 256)]
    wider = source.replace("#define BYTES_PER_THREAD 16", "#define BYTES_PER_THREAD 32")
    assert launch.geometry(wider) == (256, 32) and launch.grid(50001, wider) == (4, 256)


def test_kernel_source_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    """One disk read per version of a file, not one per launch."""
    monkeypatch.setattr(launch, "KERNELS", tmp_path)
    (tmp_path / "k.cu").write_text("#define THREADS_PER_BLOCK 128\n#define BYTES_PER_THREAD 16")
    first = launch.kernel_source("k.cu")
    assert launch.kernel_source("k.cu") is first and launch.grid(4097, first) == (2, 128)
    (tmp_path / "k.cu").write_text("#define THREADS_PER_BLOCK 64\n#define BYTES_PER_THREAD 32")
    os.utime(tmp_path / "k.cu", ns=(0, 10**9))                # a new mtime even on coarse clocks
    assert launch.geometry(launch.kernel_source("k.cu")) == (64, 32)


def test_a_source_without_the_defines_is_a_clear_error():
    with pytest.raises(ValueError, match="no `#define BYTES_PER_THREAD <number>` line"):
        launch.geometry("#define THREADS_PER_BLOCK 256")


@pytest.mark.parametrize("nested", [False, True])
def test_kernel_args_in_the_kernels_parameter_order(nested):
    """(packed, code, absmax | None, qabsmax | None, code2, absmax2, offset, out): a plain state
    passes float32 absmax, a nested one qabsmax with its dynamic code, absmax2 and offset."""
    packed, state = quantize_4bit(torch.randn(100), 64, double_quant=nested)
    out = torch.empty(100, dtype=torch.bfloat16)
    name, tensors, ints = launch.kernel_args(packed, state, out)
    assert name == "dequant_4bit_bf16" + ("_nested" if nested else "")
    assert ints == (100, 6, 8 if nested else 0)
    assert tensors[0].dtype == torch.uint8 and tensors[1].shape == (16,)
    if nested:
        assert tensors[2] is None and torch.equal(tensors[3], state.absmax)
        assert tensors[4].shape == (256,) and tensors[6].shape == (1,)
    else:
        assert torch.equal(tensors[2], state.absmax) and tensors[3:7] == [None] * 4
    assert tensors[7].dtype == torch.int16 and tensors[7].data_ptr() == out.data_ptr()


def test_a_misaligned_packed_view_is_copied_aligned():
    packed, state = quantize_4bit(torch.randn(300, 7), 64)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]
    assert shifted.data_ptr() % 16
    _, tensors, _ = launch.kernel_args(shifted, state, torch.empty(2100))
    assert tensors[0].data_ptr() % 16 == 0 and torch.equal(tensors[0], packed)


def test_check_launch_keeps_the_kernel_inside_its_buffers():
    """The shared state checks (state_checks.check_state) plus what only the kernel needs."""
    packed, state = quantize_4bit(torch.randn(100), 64)
    out = torch.empty(100)
    with pytest.raises(ValueError, match="expected 50 uint8 bytes"):
        launch.check_launch(packed[:-1], state, out)
    with pytest.raises(ValueError, match=r"out must be a contiguous, 16-byte aligned \(100,\)"):
        launch.check_launch(packed, state, torch.empty(101)[1:])           # misaligned out
    with pytest.raises(ValueError, match="out must be"):
        launch.check_launch(packed, state, torch.empty(100, dtype=torch.float64))
    with pytest.raises(ValueError, match="the state must be on meta like packed"):
        launch.check_launch(packed.to("meta"), state, out.to("meta"))
    state.state2.code = state.state2.code[:128]                     # code2[255]: past the end
    with pytest.raises(ValueError, match=r"a 256-value float state2.code .*, got 128"):
        launch.check_launch(packed, state, out)
