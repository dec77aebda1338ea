"""Property-based fuzzing of the file loaders (issue 22): load_4bit and load_adapter given
hostile files. A valid file made by save_4bit / save_adapter is changed in one or two ways:
a tensor's dtype (float8, float64, integers, bool), shape or values (NaN, Inf, 1e300, sizes up
to 2^64 in the JSON), the quant state's JSON (any JSON value in any field, deep nesting, bytes
that are no JSON), the adapter's config, or the file itself (cut short, a byte flipped, empty,
a link to /dev/zero, a FIFO, a folder, a dangling link). The property: the load succeeds and
the model holds finite values that save and load back, or it raises a ValueError and the model
is exactly as it was. Never another exception, a hang or a half-loaded model."""
import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minqlora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from minqlora.checkpoint import load_4bit, save_4bit
from minqlora.lora import LoRALinear
from minqlora.qlora import prepare_qlora
from test_fuzz import SETTINGS

safetensors = pytest.importorskip("safetensors.torch")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) |
                    st.sampled_from([2 ** 62, 2 ** 63, 2 ** 64, -1, 0, 256, 64]) |
                    st.floats(allow_nan=True) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
FILE_DAMAGE = st.sampled_from(["cut", "flip", "empty", "/dev/zero", "fifo", "folder", "dangling"])


def model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    prepared = prepare_qlora(base, r=2, target_modules=["0", "2"])
    with torch.no_grad():
        for layer in prepared.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, 0.1)
    return prepared


MODEL = model()


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same(m, before) -> bool:
    after = m.state_dict()
    return after.keys() == before.keys() and all(
        after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


@st.composite
def tensor_change(draw, t: torch.Tensor) -> torch.Tensor:
    kind = draw(st.sampled_from(["dtype", "shape", "values", "empty"]))
    if kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES))
        return t.to(dtype) if dtype != torch.bool else t != 0
    if kind == "shape":
        return t.reshape(-1)[: draw(st.integers(0, max(t.numel() - 1, 0)))].clone() \
            if draw(st.booleans()) else torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    if kind == "empty":
        return t.reshape(-1)[:0].clone()
    value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, 3e38, 0.0,
                                  -1.0, 255]))
    t = t.double().clone() if t.is_floating_point() else t.clone()
    if t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value if t.is_floating_point() \
            else int(min(max(value, 0), 255)) if value == value else 0
    return t


def damage_file(path: Path, how: str, draw) -> None:
    data = path.read_bytes()
    path.unlink()
    if how == "cut":
        path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
    elif how == "flip":
        at = draw(st.integers(0, min(len(data), 400) - 1))
        path.write_bytes(data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "folder":
        path.mkdir()
    else:
        path.symlink_to(path.parent / "nowhere")


def change_json(blob: torch.Tensor, draw) -> torch.Tensor:
    kind = draw(st.sampled_from(["field", "drop", "add", "nested", "bytes"]))
    info = json.loads(bytes(blob.tolist()).decode())
    if kind == "field":
        info[draw(st.sampled_from(sorted(info)))] = draw(JSON)
    elif kind == "drop":
        info.pop(draw(st.sampled_from(sorted(info))))
    elif kind == "add":
        info[draw(st.text(max_size=5))] = draw(JSON)
    text = (json.dumps(info) if kind not in ("nested", "bytes") else "[" * 50_000 + "]" * 50_000
            if kind == "nested" else draw(st.binary(max_size=20)).decode("latin-1"))
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def check(load, m, folder_or_file) -> str:
    before = snapshot(m)
    try:
        load(m, folder_or_file)
    except ValueError as error:
        assert str(error) and same(m, before), "refused, but the model changed"
        return "refused"
    for k, v in m.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v.float()).all(), k
    return "loaded"


@SETTINGS
@given(changes=st.integers(1, 2), data=st.data())
def test_load_4bit_takes_a_valid_file_or_refuses_it_unchanged(changes, data):
    draw = data.draw
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "model.safetensors")
        save_4bit(MODEL, path)
        if draw(st.integers(0, 4)) == 0:
            damage_file(path, draw(FILE_DAMAGE), draw)
        else:
            tensors = safetensors.load_file(path)
            for _ in range(changes):
                key = draw(st.sampled_from(sorted(tensors)))
                tensors[key] = (change_json(tensors[key], draw) if "quant_state" in key
                                else draw(tensor_change(tensors[key])))
            safetensors.save_file(tensors, path)
        m = copy.deepcopy(MODEL)
        if check(load_4bit, m, path) == "loaded":          # what loaded saves and loads back
            again = Path(folder, "again.safetensors")
            save_4bit(m, again)
            load_4bit(copy.deepcopy(MODEL), again)


@SETTINGS
@given(changes=st.integers(1, 2), data=st.data())
def test_load_adapter_takes_a_valid_folder_or_refuses_it_unchanged(changes, data):
    draw = data.draw
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(MODEL, folder)
        which = draw(st.sampled_from(["file", "config", "tensors"]))
        if which == "file":
            damage_file(Path(folder, draw(st.sampled_from([ADAPTER_CONFIG, ADAPTER_WEIGHTS]))),
                        draw(FILE_DAMAGE), draw)
        elif which == "config":
            config = json.loads(Path(folder, ADAPTER_CONFIG).read_text())
            for _ in range(changes):                # target_modules: half the changes
                key = draw(st.sampled_from(["target_modules"] * 8 + sorted(config) + ["x"]))
                config[key] = draw(st.sampled_from(["(", "[", ".*", "0|2", "all-linear", [1, 2],
                                                    ["0", "2"], ["0"], None]) | JSON)
            Path(folder, ADAPTER_CONFIG).write_text(json.dumps(config))
        else:                                       # float8 (no isfinite of its own) often
            tensors = safetensors.load_file(Path(folder, ADAPTER_WEIGHTS))
            for _ in range(changes):
                key = draw(st.sampled_from(sorted(tensors)))
                tensors[key] = (tensors[key].to(draw(st.sampled_from(DTYPES[4:6])))
                                if draw(st.booleans()) else draw(tensor_change(tensors[key])))
            safetensors.save_file(tensors, Path(folder, ADAPTER_WEIGHTS))
        m = copy.deepcopy(MODEL)
        check(load_adapter, m, folder)
