"""The model file's schema: format versions, config keys from the dataclasses, shapes, finite weights."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.model import FORMAT_VERSION, SUPPORTED_FORMATS, FieldConfig, INRField
from inrscrecon.field.schema import check_model_file


def _model(n_genes: int = 5, **extra) -> INRField:
    torch.manual_seed(0)
    genes = [f"g{i}" for i in range(n_genes)]
    cfg = FieldConfig(
        n_genes, EncodingConfig(n_bands=2), 8, 2, center=(1.0, 2.0, 3.0), scale=4.0, genes=genes, **extra
    )
    return INRField(cfg)


#: config keys that format 3 added (files of formats 1 and 2 do not have them)
FORMAT3_KEYS = ("z_stretch", "section_code_dim", "section_knots_z")


def _coded(n_genes: int = 5) -> INRField:
    """A format-3 model: z stretched, 2-dim codes on three sections, codes and projection not zero."""
    m = _model(n_genes, z_stretch=3.0, section_code_dim=2, section_knots_z=[0.0, 2.0, 5.0])
    with torch.no_grad():
        assert m.section_codes is not None
        m.section_codes.copy_(torch.arange(6.0).reshape(3, 2) / 6)
    return m


def _parts(m: INRField) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    meta = {"kind": "inrscrecon.INRField", "format": str(FORMAT_VERSION), "config": m.cfg.to_json()}
    meta["training"] = json.dumps({"holdout": []})
    return meta, {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_roundtrip_v3_keeps_weights_codes_frame_and_training_record(tmp_path):
    m = _coded()
    m.save(tmp_path / "m.safetensors", training={"holdout": ["s1"], "sections": ["s0", "s2"]})
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "3" == str(FORMAT_VERSION)
        assert set(f.keys()) >= {"section_codes", "code_proj.weight"}
        assert "knots" not in f.keys() and "stretch" not in f.keys()  # derived from the config
    back = INRField.load(tmp_path / "m.safetensors")
    assert back.cfg == m.cfg and back.training_record == {"holdout": ["s1"], "sections": ["s0", "s2"]}
    assert back.cfg.z_stretch == 3.0 and back.cfg.section_knots_z == [0.0, 2.0, 5.0]
    assert back.training is False  # nn.Module's train/eval flag is untouched by the record
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(back.knots, m.knots, rtol=0, atol=0)
    xyz = torch.tensor([[1.0, 2.0, 0.0], [0.5, 2.5, 3.1], [1.5, 1.0, 9.0]])
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(back.normalize(xyz)), m(m.normalize(xyz)), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["1", "2"])
def test_version_1_and_2_files_still_load_isotropic_without_codes(tmp_path, fmt):
    m = _model()
    meta, state = _parts(m)
    meta["format"] = fmt
    cfg = json.loads(meta["config"])
    for key in FORMAT3_KEYS:  # written before these keys existed
        del cfg[key]
    meta["config"] = json.dumps(cfg)
    if fmt == "1":
        del meta["training"]
    save_file(state, str(tmp_path / f"v{fmt}.safetensors"), metadata=meta)
    back = INRField.load(tmp_path / f"v{fmt}.safetensors")
    assert back.cfg == m.cfg and back.training_record == ({} if fmt == "1" else {"holdout": []})
    assert back.cfg.z_stretch == 1.0 and back.cfg.section_code_dim == 0 and back.section_codes is None
    assert int(fmt) in SUPPORTED_FORMATS
    # the frame of an old file is the isotropic one: normalize is (xyz - center) / scale, bit for bit
    xyz = torch.tensor([[1.0, 2.0, 3.0], [5.0, -2.0, 7.5]])
    torch.testing.assert_close(back.normalize(xyz), (xyz - back.center) / back.scale, rtol=0, atol=0)


def test_config_keys_come_from_the_dataclasses():
    m = _model()
    meta, state = _parts(m)
    cfg = json.loads(meta["config"])
    assert set(cfg) == {f.name for f in fields(FieldConfig)}
    assert set(cfg["encoding"]) == {f.name for f in fields(EncodingConfig)}
    # a file from before a field was added (with a default) loads with the default
    for key in ("genes", "scale"):
        old = dict(cfg)
        del old[key]
        loaded, _ = check_model_file(dict(meta, config=json.dumps(old)), state, "m")
        assert getattr(loaded, key) == getattr(FieldConfig(1), key)
    enc = dict(cfg, encoding={k: v for k, v in cfg["encoding"].items() if k != "n_features"})
    assert check_model_file(dict(meta, config=json.dumps(enc)), state, "m")[0].encoding.n_features == 64


def _config_with(meta: dict[str, str], **changes) -> dict[str, str]:
    cfg = json.loads(meta["config"])
    cfg.update(changes)
    return dict(meta, config=json.dumps(cfg))


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda meta, st: (dict(meta, kind="other"), st), "not an inrscrecon model file"),
        (lambda meta, st: (dict(meta, format="99"), st), "format = '99' is not supported"),
        (lambda meta, st: ({k: v for k, v in meta.items() if k != "format"}, st), "format = None"),
        (lambda meta, st: (dict(meta, config="{not json"), st), "config is not valid JSON"),
        (lambda meta, st: (dict(meta, config="[1, 2]"), st), "config must be a JSON object"),
        (lambda meta, st: (_config_with(meta, colour="blue"), st), "unknown key 'colour'"),
        (
            lambda meta, st: (_config_with(meta, n_genes=6), st),
            "config.genes lists 5 genes but config.n_genes = 6",
        ),
        (lambda meta, st: (_config_with(meta, n_genes=0), st), "config.n_genes = 0 is not an integer ≥ 1"),
        (
            lambda meta, st: (_config_with(meta, n_genes=6, genes=[]), st),
            "tensor 'head.weight' has shape [5, 8]",
        ),
        (lambda meta, st: (_config_with(meta, genes=["a", "a", "b", "c", "d"]), st), "duplicate names"),
        (lambda meta, st: (_config_with(meta, scale=-1.0), st), "config.scale = -1.0"),
        (lambda meta, st: (_config_with(meta, center=[0, 0]), st), "config.center = [0, 0]"),
        (lambda meta, st: (_config_with(meta, width="8"), st), "config.width = '8'"),
        (lambda meta, st: (_config_with(meta, encoding={"kind": "hash"}), st), "encoding.kind = 'hash'"),
        (
            lambda meta, st: (_config_with(meta, encoding={"bands": 2}), st),
            "config.encoding has unknown key 'bands'",
        ),
        (lambda meta, st: (_config_with(meta, n_layers=3), st), "lacks tensor 'trunk.layers.2."),
        (lambda meta, st: (meta, {**st, "extra": torch.zeros(1)}), "unexpected tensor 'extra'"),
        (
            lambda meta, st: (meta, {**st, "head.bias": torch.zeros(5, dtype=torch.int32)}),
            "dtype torch.int32",
        ),
        (lambda meta, st: (meta, {**st, "head.bias": torch.full((5,), float("inf"))}), "5 non-finite values"),
        (lambda meta, st: (dict(meta, training="{oops"), st), "training is not valid JSON"),
    ],
)
def test_each_schema_violation_is_one_clear_error(change, fragment):
    meta, state = change(*_parts(_model()))
    with pytest.raises(InputError) as e:
        check_model_file(meta, state, "path/m.safetensors")
    msg = str(e.value)
    assert msg.startswith("path/m.safetensors: ") and fragment in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda meta, st: (_config_with(meta, z_stretch=0.0), st), "config.z_stretch = 0.0"),
        (lambda meta, st: (_config_with(meta, z_stretch=-2), st), "config.z_stretch = -2"),
        (lambda meta, st: (_config_with(meta, z_stretch="3"), st), "config.z_stretch = '3'"),
        (lambda meta, st: (_config_with(meta, section_code_dim=-1), st), "section_code_dim = -1"),
        (lambda meta, st: (_config_with(meta, section_code_dim=1.5), st), "section_code_dim = 1.5"),
        (
            lambda meta, st: (_config_with(meta, section_knots_z=[0.0, 5.0, 2.0]), st),
            "section_knots_z = [0.0, 5.0, 2.0] is not strictly increasing",
        ),
        (
            lambda meta, st: (_config_with(meta, section_knots_z=[0.0, 2.0, 2.0]), st),
            "is not strictly increasing",
        ),
        (
            lambda meta, st: (_config_with(meta, section_knots_z=[0.0, "2", 5.0]), st),
            "section_knots_z = [0.0, '2', 5.0] is not a list of numbers",
        ),
        (
            lambda meta, st: (_config_with(meta, section_knots_z=[]), st),
            "section_code_dim = 2 but config.section_knots_z is empty",
        ),
        (
            lambda meta, st: (_config_with(meta, section_knots_z=[0.0, 2.0]), st),
            "tensor 'section_codes' has shape [3, 2] but the config (n_genes=5, width=8, n_layers=2, "
            "section_code_dim=2, 2 section knots) implies [2, 2]",
        ),
        (
            lambda meta, st: (_config_with(meta, section_code_dim=3), st),
            "tensor 'section_codes' has shape [3, 2] but the config",
        ),
        (
            lambda meta, st: (meta, {**st, "code_proj.weight": torch.zeros(8, 3)}),
            "tensor 'code_proj.weight' has shape [8, 3]",
        ),
        (
            lambda meta, st: (_config_with(meta, section_code_dim=0), st),
            "unexpected tensor 'code_proj.weight'",
        ),
        (
            lambda meta, st: ({**meta}, {k: v for k, v in st.items() if k != "section_codes"}),
            "lacks tensor 'section_codes'",
        ),
        (
            lambda meta, st: (meta, {**st, "section_codes": torch.full((3, 2), float("nan"))}),
            "tensor 'section_codes' has 6 non-finite values",
        ),
    ],
)
def test_each_format3_schema_violation_is_one_clear_error(change, fragment):
    meta, state = change(*_parts(_coded()))
    with pytest.raises(InputError) as e:
        check_model_file(meta, state, "path/m.safetensors")
    msg = str(e.value)
    assert msg.startswith("path/m.safetensors: ") and fragment in msg, msg
    assert "\n" not in msg


def test_nan_weights_refused_on_load(tmp_path):
    meta, state = _parts(_model())
    state["trunk.layers.0.weight"][1, 2] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(InputError, match="tensor 'trunk.layers.0.weight' has 1 non-finite values"):
        INRField.load(tmp_path / "nan.safetensors")


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import inrscrecon.field.model as model_mod

    path = tmp_path / "m.safetensors"
    _model().save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _model(n_genes=7).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
