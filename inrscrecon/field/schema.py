"""Schema of the model file (:mod:`inrscrecon.field.model`): every part of a loaded file is checked before a
field is built from it — a supported format, config keys that are fields of the config dataclasses (so fields
added with defaults are accepted and older files still load), values in range, tensor names and shapes that
the config implies, finite weights. Every failure is one InputError naming the file and the field."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, fields
from typing import Any

import torch

from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.model import KIND, SUPPORTED_FORMATS, FieldConfig, INRField


def _config_keys(dc: type) -> tuple[set[str], set[str]]:
    """(all field names, required field names) of a config dataclass."""
    names = {f.name for f in fields(dc)}
    required = {f.name for f in fields(dc) if f.default is MISSING and f.default_factory is MISSING}
    return names, required


def _check_keys(d: Any, dc: type, what: str, where: str) -> None:
    from inrscrecon.errors import InputError

    if not isinstance(d, dict):
        raise InputError(f"{where}: model metadata {what} must be a JSON object, got {type(d).__name__}")
    names, required = _config_keys(dc)
    extra = sorted(set(d) - names)
    if extra:
        raise InputError(
            f"{where}: model metadata {what} has unknown key {extra[0]!r} (known: {sorted(names)})"
        )
    missing = sorted(required - set(d))
    if missing:
        raise InputError(f"{where}: model metadata {what} lacks the required key {missing[0]!r}")


def _positive_int(d: dict, key: str, what: str, where: str, minimum: int = 1) -> None:
    from inrscrecon.errors import InputError

    v = d.get(key, minimum)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InputError(f"{where}: model metadata {what}.{key} = {v!r} is not an integer ≥ {minimum}")


def config_from_dict(d: Any, where: str) -> FieldConfig:
    """A :class:`FieldConfig` from its JSON object, checked field by field (keys from the dataclasses, so
    fields added with defaults are accepted and files without them still load)."""
    from inrscrecon.errors import InputError

    _check_keys(d, FieldConfig, "config", where)
    _positive_int(d, "n_genes", "config", where)
    _positive_int(d, "width", "config", where)
    _positive_int(d, "n_layers", "config", where, minimum=0)
    enc = d.get("encoding", {})
    _check_keys(enc, EncodingConfig, "config.encoding", where)
    if enc.get("kind", "fourier") not in ("fourier", "gaussian", "hashgrid"):
        raise InputError(
            f"{where}: model metadata config.encoding.kind = {enc['kind']!r} is not fourier, gaussian or hashgrid"
        )
    for key in ("n_bands", "n_features"):
        _positive_int(enc, key, "config.encoding", where, minimum=0)
    for key in ("levels", "features_per_level", "log2_table_size", "base_resolution", "max_resolution"):
        _positive_int(enc, key, "config.encoding", where)
    center = d.get("center", (0.0, 0.0, 0.0))
    if not (isinstance(center, list | tuple) and len(center) == 3 and all(_finite(c) for c in center)):
        raise InputError(f"{where}: model metadata config.center = {center!r} is not three finite numbers")
    scale = d.get("scale", 1.0)
    if not (_finite(scale) and scale > 0):
        raise InputError(f"{where}: model metadata config.scale = {scale!r} is not a positive number")
    genes = d.get("genes", [])
    if not (isinstance(genes, list) and all(isinstance(g, str) for g in genes)):
        raise InputError(f"{where}: model metadata config.genes must be a list of gene names")
    if genes and len(genes) != d["n_genes"]:
        raise InputError(
            f"{where}: model metadata config.genes lists {len(genes)} genes but config.n_genes = {d['n_genes']}"
        )
    if len(set(genes)) < len(genes):
        raise InputError(f"{where}: model metadata config.genes has duplicate names")
    if d.get("likelihood", "rmse") not in ("rmse", "poisson", "nb"):
        raise InputError(
            f"{where}: model metadata config.likelihood = {d['likelihood']!r} is not rmse, poisson or nb"
        )
    z_stretch = d.get("z_stretch", 1.0)
    if not (_finite(z_stretch) and z_stretch > 0):
        raise InputError(f"{where}: model metadata config.z_stretch = {z_stretch!r} is not a positive number")
    _positive_int(d, "section_code_dim", "config", where, minimum=0)
    for key in ("library_head", "library_detach"):
        if not isinstance(d.get(key, False), bool):
            raise InputError(f"{where}: model metadata config.{key} = {d[key]!r} is not true or false")
    lib_mean, lib_sd = d.get("library_mean", 0.0), d.get("library_sd", 1.0)
    if not (_finite(lib_mean) and _finite(lib_sd) and lib_sd > 0):
        raise InputError(
            f"{where}: model metadata config.library_mean / library_sd = {lib_mean!r} / {lib_sd!r} are not a "
            "finite number and a positive one"
        )
    if d.get("library_head", False) and d.get("likelihood", "rmse") == "rmse":
        raise InputError(
            f"{where}: model metadata config.library_head is set for an RMSE model (count models only)"
        )
    knots = d.get("section_knots_z", [])
    if not (isinstance(knots, list) and all(_finite(k) for k in knots)):
        raise InputError(
            f"{where}: model metadata config.section_knots_z = {knots!r} is not a list of numbers"
        )
    if any(b <= a for a, b in zip(knots[:-1], knots[1:])):
        raise InputError(
            f"{where}: model metadata config.section_knots_z = {knots!r} is not strictly increasing "
            "(one z per training section, sorted)"
        )
    if d.get("section_code_dim", 0) > 0 and not knots:
        raise InputError(
            f"{where}: model metadata config.section_code_dim = {d['section_code_dim']} but "
            "config.section_knots_z is empty (one z per training section)"
        )
    d = dict(d, encoding=EncodingConfig(**enc), center=tuple(float(c) for c in center))
    try:
        return FieldConfig(**d)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: model metadata config does not describe a field ({exc})") from None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_model_file(
    meta: dict[str, str], state: dict[str, torch.Tensor], where: str
) -> tuple[FieldConfig, dict[str, Any]]:
    """Validate a model file's metadata and tensors against the schema; returns (config, training record).

    InputError (naming ``where`` and the field) for: another kind of file, an unsupported ``format``, config
    that is not JSON / has unknown or missing keys / bad values, a gene list that does not match ``n_genes``,
    tensors missing, unexpected, of another shape than the config implies, or not finite.
    """
    from inrscrecon.errors import InputError

    if meta.get("kind") != KIND:
        raise InputError(f"{where}: not an inrscrecon model file (metadata kind={meta.get('kind')!r})")
    fmt = meta.get("format")
    if fmt is None or not str(fmt).isdigit() or int(fmt) not in SUPPORTED_FORMATS:
        raise InputError(
            f"{where}: model metadata format = {fmt!r} is not supported (this inrscrecon reads formats "
            f"{', '.join(map(str, SUPPORTED_FORMATS))}; was it written by a newer version?)"
        )
    try:
        raw = json.loads(meta.get("config", ""))
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: model metadata config is not valid JSON ({exc})") from None
    cfg = config_from_dict(raw, where)
    training: dict[str, Any] = {}
    if int(fmt) >= 2 and "training" in meta:
        try:
            training = json.loads(meta["training"])
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: model metadata training is not valid JSON ({exc})") from None
        if not isinstance(training, dict):
            raise InputError(f"{where}: model metadata training must be a JSON object")
    try:
        expected = {k: tuple(v.shape) for k, v in INRField(cfg).state_dict().items()}
    except Exception as exc:  # e.g. an encoding the config cannot build
        raise InputError(f"{where}: model metadata config does not describe a field ({exc})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{where}: model file lacks tensor {missing[0]!r}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InputError(f"{where}: model file has unexpected tensor {extra[0]!r}")
    for name, shape in expected.items():
        t = state[name]
        if tuple(t.shape) != shape:
            codes = (
                f", section_code_dim={cfg.section_code_dim}, {len(cfg.section_knots_z)} section knots"
                if cfg.section_code_dim
                else ""
            )
            raise InputError(
                f"{where}: tensor {name!r} has shape {list(t.shape)} but the config (n_genes={cfg.n_genes}, "
                f"width={cfg.width}, n_layers={cfg.n_layers}{codes}) implies {list(shape)}"
            )
        if not t.is_floating_point():
            raise InputError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"{where}: tensor {name!r} has {bad} non-finite values (NaN/inf)")
    return cfg, training
