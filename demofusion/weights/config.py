"""Reading ``config.json`` files: valid JSON, an object, known fields of the right type;
:func:`config_errors`, which blames a model that cannot be built on its config.json; and
:func:`component_config`, the one order in which every component loader picks its config."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import first_line
from .common import WeightsError, _is_int, _json_type


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; anything else is a one-line :class:`WeightsError`."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory, not a JSON file; remove it or re-download it")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({first_line(e)}); fix it or re-download it") from None
    except OSError as e:
        raise WeightsError(
            f"{path}: cannot be read ({first_line(e)}); check its permissions or re-download it") from None
    if not isinstance(data, dict):
        raise WeightsError(
            f"{path}: holds a JSON {_json_type(data)}, not an object; fix it or re-download it")
    return data


def read_config(folder: Path) -> dict | None:
    """``folder/config.json`` (checked: valid JSON, an object, known fields well typed), or None."""
    cfg = Path(folder) / "config.json"
    if not cfg.exists():
        return None
    data = read_json(cfg)
    _check_config_types(data, cfg)
    return data


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_int(x) for x in v)


_INT = (lambda v: _is_int(v), "an integer")
_INT_OR_LIST = (lambda v: _is_int(v) or _int_list(v), "an integer or a list of integers")
_INT_LIST = (_int_list, "a non-empty list of integers")
_NUM = (_is_num, "a number")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")
_STR_LIST = (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
             "a non-empty list of strings")

# Field types of the diffusers / transformers config.json files that the loaders read
# (null is accepted everywhere: it means "the default"). A wrong type is reported here, naming
# the field, instead of failing somewhere inside the model's constructor.
_CONFIG_TYPES = {
    "_class_name": _STR, "model_type": _STR, "act_fn": _STR, "hidden_act": _STR,
    "in_channels": _INT, "out_channels": _INT, "latent_channels": _INT, "norm_num_groups": _INT,
    "addition_time_embed_dim": _INT, "projection_class_embeddings_input_dim": _INT,
    "vocab_size": _INT, "hidden_size": _INT, "intermediate_size": _INT, "num_hidden_layers": _INT,
    "max_position_embeddings": _INT, "projection_dim": _INT, "freq_shift": _INT,
    "block_out_channels": _INT_LIST,
    "layers_per_block": _INT_OR_LIST, "transformer_layers_per_block": _INT_OR_LIST,
    "attention_head_dim": _INT_OR_LIST, "num_attention_heads": _INT_OR_LIST,
    "cross_attention_dim": _INT_OR_LIST, "sample_size": _INT_OR_LIST,
    "norm_eps": _NUM, "layer_norm_eps": _NUM, "scaling_factor": _NUM,
    "use_linear_projection": _BOOL, "flip_sin_to_cos": _BOOL, "force_upcast": _BOOL,
    "mid_block_add_attention": _BOOL, "use_quant_conv": _BOOL, "use_post_quant_conv": _BOOL,
    "down_block_types": _STR_LIST, "up_block_types": _STR_LIST, "architectures": _STR_LIST,
}


def _check_config_types(cfg: dict, path: Path) -> None:
    for key, (ok, want) in _CONFIG_TYPES.items():
        v = cfg.get(key)
        if v is not None and not ok(v):
            shown = json.dumps(v)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise WeightsError(f"{path}: {key!r} is {shown}, expected {want}; fix it or re-download it")


@contextmanager
def config_errors(config_file: str | os.PathLike | None, what: str) -> Iterator[None]:
    """Turn an error raised while reading ``config_file`` into a model (or building the model
    from it) into a one-line :class:`WeightsError` naming the file; no-op for ``None``."""
    if config_file is None:
        yield
        return
    try:
        yield
    except WeightsError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        why = f"missing field {e}" if isinstance(e, KeyError) else first_line(e)
        raise WeightsError(
            f"{config_file}: does not describe a loadable {what} ({why}); fix it or re-download it"
        ) from None


def component_config(cls, config, config_json: dict | None, config_file: Path, what: str,
                     infer: Callable[[], object], read: Callable[[dict], object] | None = None):
    """(the config a component loader builds from, the config.json it came from or None).

    In this order: ``config`` as the caller gave it (a ``cls``, a preset name where ``cls`` has
    presets, a config dict); else ``config_json``, the component's config.json at ``config_file``
    (the caller passes None when that file describes something else), read so that an error names
    the file; else ``infer()``, the config from the tensors' shapes. ``read`` turns a config dict
    into a ``cls`` (default ``cls.from_diffusers``)."""
    read = read or cls.from_diffusers
    if config is None and config_json is not None:
        with config_errors(config_file, what):
            return read(config_json), config_file
    if config is None:
        return infer(), None
    if isinstance(config, cls):
        return config, None
    presets = hasattr(cls, "preset")
    if isinstance(config, str) and presets:
        return cls.preset(config), None
    if isinstance(config, dict):
        return read(config), None
    raise TypeError(f"config must be a {cls.__name__}, {'a preset name, ' if presets else ''}or a config dict, "
                    f"not {type(config).__name__}")
