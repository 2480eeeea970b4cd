"""Stage 1: read a config file into plain data, remembering how to name places in the user's own words.

Two forms are accepted: the layered YAML (``models:`` / ``services:``) and the seed's flat ``config.py`` that
defines ``<NAME>_SERVICE_CONFIG = {...}`` dicts. The flat form is translated into the layered one here, so every
later stage sees a single shape; ``Source.locate`` maps a layered path back to the flat spelling for messages.
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sluice.errors import ConfigError, ConfigIssue

from .defaults import RUNTIME_KNOBS

FLAT_SUFFIX = "_SERVICE_CONFIG"
FLAT_SECTIONS = {"SERVER_CONFIG": "server", "GATEWAY_CONFIG": "gateway"}
MODEL_TYPES = ("embedding", "reranker", "llm")


@dataclass
class Source:
    """Config data in the layered shape, plus the file it came from."""

    name: str
    data: Any
    # Layered path prefix -> the user's spelling of it (only the flat form needs any).
    aliases: dict[str, str] = field(default_factory=dict)

    def locate(self, path: str) -> str:
        """The user's spelling of a layered dotted path."""
        best = ""
        for prefix in self.aliases:
            if (path == prefix or path.startswith(prefix + ".")) and len(prefix) > len(best):
                best = prefix
        if not best:
            return path
        return self.aliases[best] + path[len(best) :]


def load(path: str | Path) -> Source:
    """Read ``path`` (``.yaml``/``.yml`` or ``.py``) into a Source; raise ConfigError when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [ConfigIssue("<file>", "no such file")])
    if path.suffix == ".py":
        return _load_python(path)
    return _load_yaml(path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _load_yaml(path: Path) -> Source:
    try:
        # Read from the open file, not its text: PyYAML names the stream in its marks ("<unicode string>" else).
        with path.open(encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(str(path), [_yaml_issue(path, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [ConfigIssue("<file>", f"not valid YAML: {exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [ConfigIssue("<file>", f"not UTF-8 text ({exc.reason})")]) from None
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("<file>", f"cannot be read: {exc.strerror}")]) from None
    return Source(str(path), data if data is not None else {})


def _yaml_issue(path: Path, exc: yaml.MarkedYAMLError) -> ConfigIssue:
    """A YAML error located as ``path:line:column`` (1-based, as editors count), with PyYAML's own words."""
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    message = f"not valid YAML: {exc.problem or exc.context}"
    context = exc.context_mark
    elsewhere = context is not None and mark is not None and (context.line, context.column) != (mark.line, mark.column)
    if exc.context and exc.problem and context is not None and elsewhere:
        message += f" ({exc.context} started at line {context.line + 1}, column {context.column + 1})"
    return ConfigIssue(where, message)


def _load_python(path: Path) -> Source:
    # A config.py is the user's own code (as Django settings are); running it is what the form means.
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported as a config error
        raise ConfigError(str(path), [ConfigIssue("<file>", f"failed to run: {exc!r}")]) from None
    return translate_flat(str(path), namespace)


def translate_flat(name: str, namespace: dict[str, Any]) -> Source:
    """Turn ``<NAME>_SERVICE_CONFIG`` dicts into the layered shape.

    ``LLM_SERVICE_CONFIG = {"llm_model_name": ..., "batch_size": 4, ...}`` becomes model ``llm`` and service
    ``llm_service``; the model's type is the NAME unless the dict says ``type``.
    """
    data: dict[str, Any] = {"models": {}, "services": {}}
    aliases: dict[str, str] = {}
    issues: list[ConfigIssue] = []
    for variable, section in FLAT_SECTIONS.items():
        if variable in namespace:
            data[section] = namespace[variable]
            aliases[section] = variable
    for variable, value in sorted(namespace.items()):
        if not variable.endswith(FLAT_SUFFIX) or variable.startswith("_"):
            continue
        if not isinstance(value, dict):
            issues.append(ConfigIssue(variable, f"expected a dict, found {type(value).__name__}"))
            continue
        prefix = variable[: -len(FLAT_SUFFIX)].lower()
        model_key, service_key = prefix, f"{prefix}_service"
        model: dict[str, Any] = {}
        runtime: dict[str, Any] = {}
        for key, item in value.items():
            if key in RUNTIME_KNOBS:
                runtime[key] = item
            elif key == f"{prefix}_model_name":
                model["model_name"] = item
                aliases[f"models.{model_key}.model_name"] = f"{variable}.{key}"
            else:
                model[key] = item
        if "type" not in model and prefix in MODEL_TYPES:
            model["type"] = prefix
        data["models"][model_key] = model
        data["services"][service_key] = {"model": model_key, "runtime": runtime}
        aliases[f"models.{model_key}"] = variable
        aliases[f"services.{service_key}.runtime"] = variable
        aliases[f"services.{service_key}"] = variable
    if issues:
        raise ConfigError(name, issues)
    if not data["services"]:
        raise ConfigError(name, [ConfigIssue("<file>", f"defines no <NAME>{FLAT_SUFFIX} dict")])
    return Source(name, data, aliases)
