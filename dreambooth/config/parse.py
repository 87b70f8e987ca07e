"""Config text in and out: value coercion, YAML/JSON reading, dotted overrides, problem reports naming where each
value came from, config.yaml writing, the option table."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from dreambooth.errors import UserError, first_line
from dreambooth.files import write_text_atomic

if TYPE_CHECKING:
    from dreambooth.config.plan import RunPlan
    from dreambooth.config.schema import Config


def doc_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


# ----------------------------------------------------------------------------------------------- coercion

_NONE_STRINGS = {"none", "null", "~", ""}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_WORDS = {True: {"true", "yes", "on"}, False: {"false", "no", "off"}}  # what YAML 1.1 reads as a boolean


class Problem(str):
    """One problem's text, carrying the dotted keys it is about, so the message can name where they were set."""

    def __new__(cls, text: str, *keys: str):
        self = super().__new__(cls, text)
        self.keys = keys
        return self


class _Bad(Exception):
    """A value that does not fit its type; the message says what was expected."""


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
            return None
        return _coerce(value, inner[0], where, problems)
    if value is None:
        raise _Bad("must not be empty")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping of {', '.join(f.name for f in doc_fields(tp))}")
        return build(tp, value, f"{where}.", problems)
    if origin is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is Literal:
        for choice in args:
            if str(value).strip().lower() == str(choice).lower():
                return choice
        if True in args and str(value).strip().lower() in _TRUE | _FALSE:  # yes/no, on/off as for plain booleans
            return str(value).strip().lower() in _TRUE
        if isinstance(value, bool):  # YAML 1.1 read an unquoted no/off/yes/on as a boolean: map it back to the word
            words = [c for c in args if isinstance(c, str) and c.lower() in _WORDS[value]]
            if len(words) == 1:
                return words[0]
            if words:
                raise _Bad(f"got {value}, which YAML reads from {' or '.join(words)}: quote the one you mean")
        raise _Bad(f"got {value!r}; choose one of {', '.join(str(a) for a in args)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise _Bad(f"expected true or false, got {value!r}")
    if tp is int:
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise _Bad(f"expected a whole number, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
            raise _Bad(f"expected a whole number, got {value!r}")
        return int(number)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise _Bad(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise _Bad(f"expected text, got {type(value).__name__}")
        return str(value)
    return value


def _nearest(key: str, known: list[str], prefix: str) -> str:
    """The few known keys spelt most like `key` (never the whole list of options)."""
    close = difflib.get_close_matches(key, known, n=3)
    names = [f"'{prefix}{c}'" for c in close or difflib.get_close_matches(key, known, n=3, cutoff=0)]
    if not close:
        return f"no such option (nearest: {', '.join(names)})"
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" or {names[-1]}"
    return f"did you mean {listed}?"


def build(cls, data: dict, prefix: str, problems: list[str]):
    """Make a `cls` from a plain dict, appending every problem (unknown key, bad value) to `problems`."""
    known = {f.name: f for f in doc_fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            problems.append(Problem(f"unknown key '{where}': {_nearest(str(key), list(known), prefix)}", where))
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], where, problems)
        except _Bad as e:
            problems.append(Problem(f"'{where}' {e}", where))
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- loading

def is_platform_key(key: Any) -> bool:
    """A key SageMaker adds to a job's hyperparameters (sagemaker_program, ...; automatic model tuning's
    _tuning_objective_metric and the like): the platform's bookkeeping, not a training setting."""
    return isinstance(key, str) and (key.startswith("sagemaker_") or key.startswith("_"))


def _unquote(value: Any) -> Any:
    """One layer of JSON string encoding removed: SageMaker's SDK stores some hyperparameters as json.dumps
    of a string ('"constant"'), so hyperparameters.json may hold a string inside a string."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            inner = json.loads(value)
        except json.JSONDecodeError:
            return value
        return inner if isinstance(inner, str) else value
    return value


def read_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first = first_line(e)
        raise UserError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option: value, not a {type(data).__name__}")
    if path.suffix.lower() == ".json":
        data = {key: _unquote(value) for key, value in data.items()}
    return data


def apply_override(data: dict, item: str) -> str:
    """Set `a.b=value` in the nested dict, the value parsed as a YAML scalar or list; returns the key."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{item}' is not of the form key=value (e.g. max_steps=400)")
    set_key(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return key.strip()


def read_with_overrides(path: str | Path | None, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """The config file's dict (empty without a file) with `key=value` overrides applied in order, and for each
    dotted key the override that set it last, so errors can name it."""
    data = read_file(Path(path)) if path else {}
    set_by: dict[str, str] = {}
    for item in overrides:
        key = apply_override(data, item)
        set_by.pop(key, None)  # re-inserted last: a later override of a key or its parent wins
        set_by[key] = item
    return data, set_by


def set_key(data: dict, key: str, value: Any) -> None:
    """Set dotted `key` (a.b.c) in the nested dict, making the sections on the way."""
    parts, node = key.split("."), data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


COMMAND_LINE = "the command line"


def _origins(problem: str, source: str, set_by: dict[str, str]) -> list[tuple[str, str | None]]:
    """Where a problem's keys were set: [(place, the override's key=value or None)], e.g. [(COMMAND_LINE, "a=1")]."""
    found = []
    for key in getattr(problem, "keys", ()):
        item = None
        for set_key, text in set_by.items():  # in order, so the last override covering the key wins
            if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")):
                item = text
        origin = (COMMAND_LINE, item) if item else (source, None)
        found += [origin] if origin not in found else []
    return found or [(source, None)]


def report_problems(problems: list[str], source: str, set_by: dict[str, str]) -> str:
    """One message for every problem, each attributed to `source` (the file) or to the override in `set_by`
    (dotted key -> key=value) that set its value."""
    origins = [_origins(p, source, set_by) for p in problems]
    used = {place for found in origins for place, _ in found}
    places = [place for place in dict.fromkeys((source, COMMAND_LINE)) if place in used]  # the file first

    def label(found, short: bool) -> str:  # short: the header already names the one place
        parts = [item if short else f"{place} ({item})" if item else place for place, item in found]
        return " and ".join(part for part in parts if part)

    if len(problems) == 1:
        return f"{label(origins[0], False)}: {problems[0]}"
    head = f"{' and '.join(places)} {'has' if len(places) == 1 else 'have'} {len(problems)} problems:"
    labels = [label(found, len(places) == 1) for found in origins]
    return head + "".join(f"\n  - {name}: {p}" if name else f"\n  - {p}" for p, name in zip(problems, labels))


def flatten_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        keys.add(prefix + str(k))
        if isinstance(v, dict):
            keys |= flatten_keys(v, f"{prefix}{k}.")
    return keys


def config_to_dict(cfg: Config) -> dict:
    """Plain-data form of the config, as written to output_dir/config.yaml (without the fields the schema marks
    internal, which are all top-level: provided)."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            del out[f.name]
    return out


def flatten_config(cfg: Config, skip: set[str] = frozenset()) -> dict[str, Any]:
    """The config as {dotted key: value}, leaving out the top-level keys in `skip`."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if not prefix and key in skip:
                continue
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value
    walk(config_to_dict(cfg), "")
    return flat


def _scalar(value: Any) -> str:
    """A scalar as YAML shows it (true, null, bf16), for comparing and for comments."""
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def save_config(plan: RunPlan, path: str | Path) -> None:
    """Write config.yaml as a rerunnable record: each key as the user gave it (auto where this machine decided it),
    with what this run decided in a comment."""
    cfg = plan.config
    data, notes = config_to_dict(cfg), {}
    for key, choice in plan.choices.items():
        data[key] = choice.given
        notes[key] = f"{_scalar(choice.value)} ({choice.why})" if choice.why else _scalar(choice.value)
    data["learning_rate"] = plan.learning_rate  # LoRA's own default rate is written as if given: it reruns the same
    if "lora" in plan.export_formats and "export_formats" not in cfg.provided:  # an adapter run (plan.py)
        # Unset, an adapter run exports its adapter alone; the written default [diffusers] would add a merged pipeline.
        data["export_formats"] = list(plan.export_formats)
    text = ""
    for key, value in data.items():  # one key at a time, so a comment lands on that key's line
        entry = yaml.safe_dump({key: value}, sort_keys=False)
        if key in notes:
            entry = entry.rstrip("\n") + f"  # this run: {notes[key]}\n"
        text += entry
    write_text_atomic(path, text)
