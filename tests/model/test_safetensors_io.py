"""The safetensors reader and writer, and checkpoint directories: every malformed file, index, config
or parameter tree is a ValueError naming the file and the tensor (or field); the writer's files are the
safetensors library's format."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from refimpl import load_pretrained
from refimpl.model import save_pretrained
from refimpl.model.safetensors_io import open_safetensors, read_safetensors_file, write_safetensors

from .students_helpers import hub_config, random_student


def _raw(path, header, data=b"", length=None):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(text) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + text + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def one(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"a": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}}


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b""), "0 bytes"),
    (lambda p: p.write_bytes(b"\x01\x02"), "2 bytes"),
    (lambda p: _raw(p, GOOD, b"\0" * 8, length=10 ** 6), "bad header length"),
    (lambda p: _raw(p, GOOD, b"\0" * 8, length=0), "bad header length"),
    (lambda p: _raw(p, b"{not json", b""), "not valid JSON"),
    (lambda p: _raw(p, b"\xff\xfe\x00", b""), "not valid JSON"),
    (lambda p: _raw(p, [1, 2], b""), "must be a JSON object"),
    (lambda p: _raw(p, one("Q7"), b"\0" * 8), "tensor 'a'.*unknown dtype"),
    (lambda p: _raw(p, {"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a'.*no 'dtype'"),
    (lambda p: _raw(p, {"a": 3}, b""), "tensor 'a'.*must be an object"),
    (lambda p: _raw(p, one(), b"\0" * 4), "tensor 'a'.*out of range"),
    (lambda p: _raw(p, one(offs=(4, 2)), b"\0" * 8), "tensor 'a'.*out of range"),
    (lambda p: _raw(p, one(shape=(3,)), b"\0" * 8), "tensor 'a'.*needs 12"),
    (lambda p: _raw(p, one(shape=(-1,)), b"\0" * 8), "tensor 'a'.*shape"),
    (lambda p: _raw(p, {**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "tensor 'b'.*overlap"),
    (lambda p: _raw(p, {**GOOD, "__metadata__": [1]}, b"\0" * 8), "__metadata__"),
])
def test_malformed_files_name_the_file_and_tensor(tmp_path, make, match):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ValueError, match=match) as e:
        open_safetensors(path)
    assert str(path) in str(e.value)


def test_truncated_after_the_header_is_named(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": np.arange(6.0)})
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match="tensor 'w'.*out of range") as e:
        open_safetensors(path)
    assert str(path) in str(e.value)


@settings(max_examples=20)
@given(shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=4),
       dt=st.sampled_from(["float64", "float32", "float16", "int64", "int8", "uint8", "bool"]), seed=st.integers(0, 99))
def test_writer_output_is_read_by_the_safetensors_library_and_back(tmp_path_factory, shapes, dt, seed):
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}.weight": np.asarray(rng.standard_normal(s) * 50).astype(dt) for i, s in enumerate(shapes)}
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    write_safetensors(path, tensors)
    theirs, ours = load_file(str(path)), read_safetensors_file(path)
    for k, a in tensors.items():
        np.testing.assert_array_equal(theirs[k], a)
        np.testing.assert_array_equal(ours[k], a)
        assert ours[k].dtype == a.dtype
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0      # header padded as the library does
    # and the library's files are read by ours
    save_file(tensors, str(path))
    for k, a in read_safetensors_file(path).items():
        np.testing.assert_array_equal(a, tensors[k])


def test_writer_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="tensors\\['c'\\]: dtype complex128"):
        write_safetensors(tmp_path / "x.safetensors", {"c": np.zeros(2, complex)})
    with pytest.raises(TypeError, match="tensors\\['l'\\]"):
        write_safetensors(tmp_path / "x.safetensors", {"l": [1.0]})
    with pytest.raises(ValueError, match="tensor name"):
        write_safetensors(tmp_path / "x.safetensors", {"": np.zeros(2)})
    assert not os.listdir(tmp_path)                                 # atomic: nothing half-written


@pytest.fixture
def student_dir(tmp_path):
    config, params = random_student(hub_config("qwen2", hk=2))
    save_pretrained(tmp_path / "m", params, config, max_shard_bytes=4000)
    return tmp_path / "m", config, params


def test_directory_errors_name_the_file_tensor_or_field(student_dir):
    path, config, params = student_dir
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="config.json: missing required field 'hidden_size'"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 25}))
    with pytest.raises(ValueError, match="tensor 'model.layers.0.mlp.gate_proj.weight' in .*model-0000.-of-.*"
                                         "has shape \\(24, 16\\), expected \\(25, 16\\)"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.1.* in .*safetensors"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**index["weight_map"], "extra.weight": shard}}))
    with pytest.raises(ValueError, match=f"tensor 'extra.weight' is mapped to shard '{shard}'"):
        load_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("gone.safetensors" if v == shard else v) for k, v in index["weight_map"].items()}}))
    with pytest.raises(ValueError, match="shard file 'gone.safetensors'"):
        load_pretrained(path)
    (path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="index.json: expected an object with a non-empty 'weight_map'"):
        load_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / shard).write_bytes((path / shard).read_bytes()[:100])
    with pytest.raises(ValueError, match=shard):
        load_pretrained(path)
    with pytest.raises(ValueError, match="dtype: expected float32 or float64"):
        load_pretrained(path, dtype=np.int32)


def test_save_refuses_params_and_configs_that_would_not_load(tmp_path):
    config, params = random_student(hub_config("qwen2", hk=2))
    attn = params["model"]["layers"][0]["self_attn"]
    bad = [({"o_proj_bias": np.zeros(16)}, "unexpected (parameter|entry) .*o_proj_bias"),
           ({"q_proj_bias": np.zeros(5)}, "q_proj_bias(: expected shape| has shape).*\\(5,\\)"),
           ({"q_proj": attn["q_proj"].astype(np.int64)}, "q_proj(: expected dtype| must be a) float32"),
           ({"q_proj_bias": None}, "q_proj_bias(: expected| must be a)")]
    for change, match in bad:
        p = {**params, "model": {**params["model"], "layers": [
            {**params["model"]["layers"][0], "self_attn": {**attn, **change}}, *params["model"]["layers"][1:]]}}
        with pytest.raises((ValueError, TypeError), match=match):   # the shared tree check raises TypeError for dtypes
            save_pretrained(tmp_path / "x", p, config)
    missing = {**params, "model": {k: v for k, v in params["model"].items() if k != "norm"}}
    with pytest.raises(ValueError, match="missing (model/norm|tensor model.norm)"):
        save_pretrained(tmp_path / "x", missing, config)
    tied = config.replace(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head differs"):
        save_pretrained(tmp_path / "x", params, tied)
    odd = config.replace(extra={**config.extra, "model_type": "mistral"})
    with pytest.raises(ValueError, match="model_type"):
        save_pretrained(tmp_path / "x", params, odd)
    assert not (tmp_path / "x").exists()
