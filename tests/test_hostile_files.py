"""Issue 22, hostile files: adapter saves that lost data (items 2, 3), non-finite values after
a cast (7), errors from inside other libraries (10), links to devices and FIFOs (12). Each
test names its item; each failed on the code before the fix."""
import errno
import json
import os
import threading

import pytest
import torch
from torch import nn

from minqlora import adapter, files
from minqlora.adapter import ADAPTER_CONFIG, PREFIX, ADAPTER_WEIGHTS, load_adapter, save_adapter
from minqlora.checkpoint import load_4bit, save_4bit
from minqlora.qlora import prepare_qlora
from minqlora.toy import ToyLM

from helpers import prepared_toy

safetensors = pytest.importorskip("safetensors.torch")


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def in_time(fn, seconds=30):
    """fn()'s exception (None if it returned), failing if it runs longer than `seconds`."""
    box = []

    def run():
        try:
            fn()
            box.append(None)
        except BaseException as e:                 # noqa: BLE001 (handed to the test)
            box.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"still running after {seconds} s (a hang)"
    return box[0]


# item 2: private, unique temporary files
def test_item2_a_link_at_the_old_temporary_name_is_never_written_through(tmp_path):
    victim, folder = tmp_path / "victim.txt", tmp_path / "adapter"
    victim.write_text("precious")
    folder.mkdir()
    (folder / f"{ADAPTER_CONFIG}.tmp").symlink_to(victim)
    (folder / f"{ADAPTER_WEIGHTS}.tmp").write_text("the user's own file")
    save_adapter(prepared_toy(), folder)
    assert victim.read_text() == "precious"
    assert (folder / f"{ADAPTER_WEIGHTS}.tmp").read_text() == "the user's own file"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, f"{ADAPTER_CONFIG}.tmp",
         f"{ADAPTER_WEIGHTS}.tmp"])                                   # no temporaries left
    load_adapter(prepared_toy(seed=1), folder)


def test_item2_concurrent_saves_into_one_folder_all_succeed(tmp_path):
    model, errors = prepared_toy(), []

    def saves():
        for _ in range(25):
            try:
                save_adapter(model, tmp_path)
            except Exception as e:                # noqa: BLE001 (counted)
                errors.append(e)
    threads = [threading.Thread(target=saves) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    load_adapter(prepared_toy(seed=1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])


# item 3: the pair is replaced as one
def test_item3_a_failed_config_write_keeps_the_old_pair(tmp_path, monkeypatch):
    old = prepared_toy(r=4)
    save_adapter(old, tmp_path)
    real_open = open

    def full_disk(path, *args, **kwargs):
        if ADAPTER_CONFIG in os.fspath(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(files, "open", full_disk, raising=False)   # files.text_writer
    with pytest.raises(OSError, match="No space"):
        save_adapter(prepared_toy(r=8, seed=2), tmp_path)
    monkeypatch.undo()
    fresh = prepared_toy(r=4, seed=3)
    load_adapter(fresh, tmp_path)                  # the old pair, whole
    assert_unchanged(fresh, {**snapshot(fresh), **{k: v for k, v in old.state_dict().items()
                                                    if "lora_" in k}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])


# item 7: finiteness in the dtype the model will hold
def test_item7_an_adapter_weight_that_overflows_float32_is_refused(tmp_path):
    save_adapter(prepared_toy(), tmp_path)
    tensors = safetensors.load_file(tmp_path / ADAPTER_WEIGHTS)
    key = f"{PREFIX}layers.0.q_proj.lora_A.weight"
    tensors[key] = tensors[key].double()
    tensors[key][0, 0] = 1e300
    safetensors.save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    model = prepared_toy(seed=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite values in torch.float32"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("key, value", [("1.weight", float("nan")), ("1.bias", 1e300),
                                        ("0.bias", 1e300), ("2.bias", float("-inf"))])
def test_item7_load_4bit_refuses_non_finite_plain_tensors_and_biases(tmp_path, key, value):
    """A NaN LayerNorm weight, a float64 1e300 bias (inf in float32), of plain layers and of
    Linear4bit layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    model = prepare_qlora(model, r=2, target_modules=["0", "2"])
    path = tmp_path / "model.safetensors"
    save_4bit(model, path)
    tensors = safetensors.load_file(path)
    assert key in tensors, sorted(tensors)[:8]
    tensors[key] = tensors[key].double()
    tensors[key].view(-1)[0] = value
    safetensors.save_file(tensors, path)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{key}: non-finite"):
        load_4bit(model, path)
    assert_unchanged(model, before)


# item 10: clear errors, never one from inside json, re or torch
def rewrite_config(folder, **fields):
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config.update(fields)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("targets", ["(", [1, 2], {"q_proj": 1}, 3])
def test_item10_bad_target_modules_are_a_value_error(tmp_path, targets):
    save_adapter(prepared_toy(), tmp_path)
    rewrite_config(tmp_path, target_modules=targets)
    with pytest.raises(ValueError, match="target_modules"):
        load_adapter(prepared_toy(), tmp_path)


def test_item10_a_deeply_nested_config_is_a_value_error(tmp_path):
    save_adapter(prepared_toy(), tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=ADAPTER_CONFIG):
        load_adapter(prepared_toy(), tmp_path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_item10_float8_adapter_weights_load_or_fail_clearly(tmp_path, dtype):
    """float8 has no isfinite of its own: the values are checked after the cast."""
    model = prepared_toy()
    save_adapter(model, tmp_path)
    tensors = {k: v.to(dtype) for k, v in safetensors.load_file(tmp_path / ADAPTER_WEIGHTS).items()}
    safetensors.save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    fresh = prepared_toy(seed=1)
    load_adapter(fresh, tmp_path)
    for name, layer in adapter.lora_layers(fresh).items():
        assert torch.equal(layer.lora_A.weight, tensors[f"{PREFIX}{name}.lora_A.weight"].float())


# item 12: only regular files are read, within a cap, without blocking
@pytest.mark.parametrize("which", [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "folder"])
def test_item12_special_files_are_refused_without_reading_them(tmp_path, which, kind):
    save_adapter(prepared_toy(), tmp_path)
    target = tmp_path / which
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(kind)
    error = in_time(lambda: load_adapter(prepared_toy(), tmp_path))
    assert isinstance(error, ValueError) and "not a regular file" in str(error), error


def test_item12_a_config_beyond_the_cap_is_refused(tmp_path):
    save_adapter(prepared_toy(), tmp_path)
    with open(tmp_path / ADAPTER_CONFIG, "r+") as f:
        f.truncate(64 << 20)                       # sparse: 64 MiB of zeros, nothing written
    with pytest.raises(ValueError, match="more than"):
        load_adapter(prepared_toy(), tmp_path)


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_item12_load_4bit_refuses_special_files(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(kind)
    model = prepare_qlora(ToyLM(), r=2)
    error = in_time(lambda: load_4bit(model, path))
    assert isinstance(error, ValueError) and "not a regular file" in str(error), error


def test_save_4bit_leaves_no_temporary_and_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("model.safetensors.tmp", ".model.safetensors.tmp"):
        (tmp_path / name).symlink_to(victim)
    save_4bit(prepare_qlora(ToyLM(), r=2), tmp_path / "model.safetensors")
    assert victim.read_text() == "precious"
    assert {p.name for p in tmp_path.iterdir()} == {
        "victim", "model.safetensors", "model.safetensors.tmp", ".model.safetensors.tmp"}
