"""The compiler's stages in order: load -> schema -> check -> plan -> render -> write."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sluice.errors import ConfigError, ConfigIssue

from .artifacts import repository_digest, service_artifacts
from .check import check, check_references
from .defaults import resolve_runtime
from .load import Source, load
from .plan import RepositoryPlan, plan_service
from .render import MARKER_NAME, read_marker_digest, render_marker, render_repository
from .schema import validate
from .write import Content, write_repository

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Compiled:
    source: Source
    plan: RepositoryPlan
    warnings: list[ConfigIssue]


def build_plan(config_path: str | Path) -> Compiled:
    """Load, validate and plan a config; raise ConfigError with every issue found."""
    source = load(config_path)
    config, issues = validate(source.data)
    issues += check_references(source.data)
    if config is None or issues:
        raise _config_error(source, issues)
    runtimes = {
        name: resolve_runtime(config.models[service.model].type, service.runtime.model_dump())
        for name, service in sorted(config.services.items())
    }
    findings = check(config, runtimes)
    if findings.errors:
        raise _config_error(source, findings.errors)
    plan = RepositoryPlan(
        config, tuple(plan_service(name, config, runtime) for name, runtime in runtimes.items())
    )
    return Compiled(source, plan, [_relocate(source, issue) for issue in findings.warnings])


def compile_repository(
    config_path: str | Path, out: Path, *, cache_root: Path | None = None, progress: Progress | None = None
) -> Compiled:
    """Compile ``config_path`` into the model repository ``out``; nothing is written on error, and nothing at
    all when the repository is already current.

    ``cache_root`` holds the ONNX exports (default: ``.sluice/cache`` beside the config file).
    """
    say = progress or (lambda _: None)
    compiled = build_plan(config_path)
    config_dir = Path(config_path).resolve().parent
    cache_root = cache_root or config_dir / ".sluice" / "cache"
    artifacts = {
        service.name: service_artifacts(service, config_dir, cache_root, say, config_file=Path(config_path))
        for service in compiled.plan.services
    }
    texts = render_repository(compiled.plan, {name: found.fingerprint for name, found in artifacts.items()})
    digest = repository_digest(texts, artifacts)
    marker = out / MARKER_NAME
    if marker.is_file() and read_marker_digest(marker.read_text(encoding="utf-8")) == digest:
        say(f"{out} is up to date")
        return compiled
    files: dict[str, Content] = {**texts, MARKER_NAME: render_marker(digest)}
    for found in artifacts.values():
        files.update(found.files)
    write_repository(files, out)
    return compiled


def _relocate(source: Source, issue: ConfigIssue) -> ConfigIssue:
    return ConfigIssue(source.locate(issue.path), issue.message)


def _config_error(source: Source, issues: list[ConfigIssue]) -> ConfigError:
    return ConfigError(source.name, [_relocate(source, issue) for issue in issues])
