"""What every config shares: strict attributes, the round trip through plain dicts and YAML
(``yaml.safe_load`` only), dotted overrides, values read as on the command line, and help text read
from the comments beside the fields.

The configs themselves, their defaults and their range checks are in `config`.
"""
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

__all__ = ["Strict", "ConfigBase", "parse_value", "describe_fields"]

# a number YAML 1.1 leaves as text ("1e-3": no dot); read as a float, in a file as on the command line
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """A flag's value read as YAML (``yaml.safe_load``), with number-like text ("1e-3") as a float."""
    value = _load_yaml(text, f"the value {text!r}")
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``; a syntax error becomes a ValueError naming `source`, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{source} is not valid YAML{where}: {problem}") from None


class Strict:
    """Setting an attribute a config does not have is an error, not a silent new attribute."""

    def __setattr__(self, name: str, value: Any) -> None:
        fields = getattr(self, "__dataclass_fields__", {})
        if name not in fields and not isinstance(getattr(type(self), name, None), property):
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"{type(self).__name__} has no option {name!r}{hint} "
                                 f"(options: {', '.join(fields)})")
        super().__setattr__(name, value)


class ConfigBase(Strict):
    """A config that round-trips through plain dicts and YAML: dotted keys, unknown keys refused."""

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (lists for tuples), safe for YAML and JSON."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self, path: Optional[Union[str, Path]] = None) -> str:
        """YAML text of the full config; also written to `path` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ConfigBase":
        """Build from a (possibly partial) nested dict; unknown keys and wrong types raise ValueError."""
        return _from_dict(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, text_or_path: Union[str, Path]) -> "ConfigBase":
        """Build from YAML text or a path to a YAML file (read with ``yaml.safe_load``).

        Raises:
            ValueError: a YAML syntax error (with its line and column), or a bad key or value; for a file,
                the message starts with its path.
        """
        source = "config YAML"
        if isinstance(text_or_path, Path) or (
                isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith((".yaml", ".yml"))):
            source = str(text_or_path)
            text_or_path = Path(text_or_path).read_text()
        data = _load_yaml(text_or_path, source)
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{source} must be a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.from_dict(data or {})
        except ValueError as e:
            if source == "config YAML":
                raise
            raise ValueError(f"{source}: {e}") from None

    def override(self, dotted: Dict[str, Any]) -> "ConfigBase":
        """A copy with dotted keys replaced, e.g. ``{"transfer.lr": 0.1}``."""
        data = self.to_dict()
        for key, value in dotted.items():
            node, parts = data, key.split(".")
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ValueError(f"unknown config key {key!r}")
                node = node[p]
            if parts[-1] not in node:
                raise ValueError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
            node[parts[-1]] = value
        return type(self).from_dict(data)


def describe_fields(config: Any, prefix: str = "") -> Dict[str, str]:
    """Dotted key -> one line on it, for every field of the dataclass `config` (nested ones as dotted keys):
    the comment beside the field in its class's source (its meaning and allowed values), the type it takes
    and its default in `config`; e.g. ``"transfer.lr"`` -> "peak learning rate (a number; default 0.01)"."""
    hints, comments = typing.get_type_hints(type(config)), _field_comments(type(config))
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(describe_fields(value, f"{prefix}{f.name}."))
            continue
        default = yaml.safe_dump(_to_plain(value), default_flow_style=True).strip()
        default = default[:-3].strip() if default.endswith("...") else default  # yaml's end-of-document mark
        meaning = comments.get(f.name, "")
        out[prefix + f.name] = f"{meaning}{' (' if meaning else '('}{_describe(hints[f.name])}; default {default})"
    return out


@functools.lru_cache(maxsize=None)
def _field_comments(cls: type) -> Dict[str, str]:
    """Field name -> its comment in `cls`'s source (and its base classes'): the ``# ...`` at the end of the
    field's line and the comment-only lines right below it, joined."""
    out: Dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):  # no source shipped: the type and default alone
            continue
        source = textwrap.dedent("".join(lines))  # the same lines, so line numbers agree
        comments = {t.start[0]: t.string.lstrip("#").strip() for t in
                    tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
        code_lines = {i + 1 for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")}
        body = ast.parse(source).body[0].body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                words, line = [], node.end_lineno
                while line in comments and (line == node.end_lineno or line not in code_lines):
                    words.append(comments[line])
                    line += 1
                if words:
                    out[node.target.id] = " ".join(words)
    return out


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_dict(cls: type, data: Dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        path = prefix + str(key)
        if key not in names:
            raise ValueError(f"unknown config key {path!r}; valid keys: {', '.join(prefix + n for n in names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            factory = fields[key].default_factory
            if isinstance(value, dict) and factory is not dataclasses.MISSING:  # a partial section keeps this
                value = {**dataclasses.asdict(factory()), **value}  # field's defaults (baseline.epochs = 0)
            kwargs[key] = _from_dict(hint, value, path + ".")
        else:
            kwargs[key] = _check_type(value, hint, path)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, path: str) -> Any:
    """Return `value` coerced to `hint` (list -> tuple, int -> float), or raise ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        for arg in args:
            try:
                return _check_type(value, arg, path)
            except ValueError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and (args[-1] is Ellipsis or len(value) == len(args)):
            item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
            return tuple(_check_type(v, t, path) for v, t in zip(value, item_types))
    elif hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as text
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ValueError(f"config key {path!r} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    """A type hint in words: ``Optional[float]`` -> "a number or null", ``Union[int, str]`` -> "an int or a str"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        n = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {n}{_describe(args[0]).split(' ', 1)[1]}s"
    return {type(None): "null", float: "a number", int: "an int", bool: "true or false",
            str: "a str"}.get(hint, getattr(hint, "__name__", str(hint)))
