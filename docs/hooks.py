"""mkdocs hook: the reference pages, generated from the code at build time (never committed).

- ``reference/cli.md``: every command and flag of ``loraship``, read from the argparse parser that
  ``loraship.cli.build_parser()`` builds (a flag added there appears here on the next build).
- ``reference/configuration.md``: every key of a ``loraship.yaml`` job, read from the pydantic models of
  ``loraship.run.job`` (``MergeJob`` and the models nested in it): name, type, default, limits; the meaning
  comes from the key table of ``configuration.md``, and a key of the schema missing there (or a key there
  that the schema lacks) is a warning, so ``mkdocs build --strict`` fails until the page is brought up to date.
- ``<!-- loraship:action -->`` in a page: the inputs and outputs that ``action.yml`` declares.
- ``<!-- loraship:errors -->`` in a page: the table of :mod:`loraship.errors`' classes; the page must have a
  ``### ClassName`` section for each (a class without one is a warning, so ``mkdocs build --strict`` fails).

Registered in mkdocs.yml under ``hooks:``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.loraship")

CLI_PAGE = "reference/cli.md"
CONFIG_PAGE = "reference/configuration.md"
CONFIG_GUIDE = "configuration.md"
ERRORS_MARKER = "<!-- loraship:errors -->"
ACTION_MARKER = "<!-- loraship:action -->"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    guide = files.get_file_from_path(CONFIG_GUIDE)
    meanings = documented_keys(guide.content_string if guide is not None else "")
    for uri, render in ((CLI_PAGE, cli_reference), (CONFIG_PAGE, lambda: config_reference(meanings))):
        if files.get_file_from_path(uri) is not None:
            raise PluginError(f"docs/{uri} is generated at build time by docs/hooks.py: delete the committed file.")
        files.append(File.generated(config, uri, content=render()))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if ERRORS_MARKER in markdown:
        markdown = markdown.replace(ERRORS_MARKER, errors_table(markdown, page.file.src_uri))
    if ACTION_MARKER in markdown:
        markdown = markdown.replace(ACTION_MARKER, action_tables(Path(config.config_file_path).parent / "action.yml"))
    return markdown


# --------------------------------------------------------------------------- helpers


def cell(text: object) -> str:
    """Text for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text: object) -> str:
    """Inline code for a table cell (backticks inside are doubled around)."""
    text = cell(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


# --------------------------------------------------------------------------- the CLI


def cli_reference() -> str:
    from loraship.cli import build_parser

    parser = build_parser()
    lines = [
        "# CLI reference",
        "",
        "Generated from `loraship.cli.build_parser()` when the docs are built: every command and every flag "
        "that `loraship --help` shows. For what the commands do, see the pages on "
        "[`loraship run`](../run.md), [local folders](../local.md) and [verification](../verification.md); "
        "for what they exit with, [exit codes](../exit-codes.md).",
        "",
        *usage_block(parser),
        *options_table(parser),
    ]
    for name, sub, help_text in subcommands(parser):
        lines += ["", f"## `loraship {name}`", ""]
        if help_text:
            lines += [help_text[0].upper() + help_text[1:] + ".", ""]
        lines += [*usage_block(sub), *options_table(sub)]
    return "\n".join(lines) + "\n"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases point at the same parser
                    seen.add(id(sub))
                    found.append((name, sub, helps.get(name, "")))
    return found


def usage_block(parser: argparse.ArgumentParser) -> list[str]:
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return ["```", formatter.format_help().strip(), "```", ""]


def options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        rows.append(f"| {argument_text(action)} | {cell(action.help or '')} | {default_text(action)} |")
    if not rows:
        return []
    return ["| argument | meaning | default |", "|---|---|---|", *rows]


def argument_text(action: argparse.Action) -> str:
    names = ", ".join(action.option_strings) or (action.metavar or action.dest)
    shown = code(names)
    if action.nargs == 0:  # a switch
        pass
    elif action.choices is not None and not isinstance(action.choices, dict):
        shown += " " + code("{" + ",".join(map(str, action.choices)) + "}")
    elif action.option_strings:
        metavar = action.metavar or action.dest.upper()
        shown += " " + code(" ".join(metavar) if isinstance(metavar, tuple) else metavar)
    if action.required:
        shown += " (required)"
    if action.nargs in ("*", "+", argparse.REMAINDER) or isinstance(action, argparse._AppendAction):
        shown += " (repeatable)"
    return shown


def default_text(action: argparse.Action) -> str:
    default = action.default
    if action.nargs == 0 or default is None or default is argparse.SUPPRESS or action.required:
        return ""
    return code(default)


# --------------------------------------------------------------------------- the configuration


def documented_keys(markdown: str) -> dict[str, str]:
    """The key table of configuration.md: ``| `publish.mode` | meaning |`` rows, by key."""
    rows = re.findall(r"^\|\s*`([\w.]+)`\s*\|\s*(.*?)\s*\|\s*$", markdown, re.M)
    return {key: meaning for key, meaning in rows}


def config_reference(meanings: dict[str, str]) -> str:
    from pydantic import BaseModel

    from loraship.run import job as job_module
    from loraship.run.job import MergeJob

    lines = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models of `loraship.run.job` (`MergeJob` and the models nested in it) when "
        "the docs are built: every key a job in `loraship.yaml` takes, with its type, default and limits. "
        "Only `adapter` and `output` are required; an unknown key is an error that names the key and its line. "
        "[Configuration](../configuration.md) explains them, with the complete example file.",
        "",
    ]
    queue: list[tuple[str, type[BaseModel]]] = [("", MergeJob)]
    schema_keys: set[str] = set()
    while queue:
        prefix, model = queue.pop(0)
        title = f"`{prefix}`" if prefix else "A job"
        lines += [f"## {title}", ""]
        doc = inspect.getdoc(model) or ""
        if doc:
            lines += [rst_to_markdown(doc.split("\n\n")[0].replace("\n", " "), job_module), ""]
        comments = field_comments(model)
        lines += ["| key | type | default | limits | description |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if model is MergeJob and name == "name":
                continue  # a job's name is its key under `jobs:`
            key = f"{prefix}.{name}" if prefix else name
            schema_keys.add(key)
            nested = nested_model(field.annotation)
            if nested is not None:
                queue.append((key, nested))
            description = relinked(meanings[key]) if key in meanings else ""
            description = description or field.description or rst_to_markdown(comments.get(name, ""), job_module)
            if key not in meanings:
                log.warning(
                    f"docs/{CONFIG_GUIDE}: the job key `{key}` (loraship.run.job) has no row in its key table: "
                    "add `| `{key}` | meaning |`."
                )
            if nested is not None:
                description = (description + "; " if description else "") + f"see [`{key}`](#{anchor(key)})"
            lines.append(
                f"| {code(key)} | {cell(type_text(field.annotation))} | {default_of(field)} | "
                f"{cell(limits(field))} | {cell(description)} |"
            )
        lines.append("")
    for key in sorted(set(meanings) - schema_keys):
        log.warning(
            f"docs/{CONFIG_GUIDE}: its key table has `{key}`, which no job takes (loraship.run.job): remove it."
        )
    return "\n".join(lines) + "\n"


def relinked(markdown: str) -> str:
    """Relative links of a docs/ page, for a page one folder down (docs/reference/)."""
    return re.sub(r"\]\((?![a-z]+:|#|/)", "](../", markdown)


def rst_to_markdown(text: str, module: Any = None) -> str:
    """Sphinx roles and double backticks as Markdown code; a ``:data:`NAME``` of ``module`` shows its value."""

    def role(match: re.Match[str]) -> str:
        name = match[2].split(".")[-1]
        value = getattr(module, name, None) if match[1] == "data" else None
        return f"`{name}` (`{value}`)" if isinstance(value, (str, int, float)) else f"`{name}`"

    return re.sub(r":(\w+):`~?([^`]+)`", role, text).replace("``", "`")


def anchor(key: str) -> str:
    """The id mkdocs' toc extension gives the heading `` `key` ``."""
    return re.sub(r"[^\w\- ]", "", key).strip().lower().replace(" ", "-")


def nested_model(annotation: Any) -> Any:
    from pydantic import BaseModel

    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if inspect.isclass(candidate) and issubclass(candidate, BaseModel):
            return candidate
    return None


def type_text(annotation: Any) -> str:
    """A type as a reader of YAML sees it: ``'commit' | 'pr'``, ``string | null``, ``list[string]``."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin in (typing.Annotated,):
        return type_text(args[0])
    if origin in (list, tuple, set, frozenset):
        return f"list[{' | '.join(type_text(a) for a in args if a is not Ellipsis)}]" if args else "list"
    if origin is dict:
        return f"mapping[{type_text(args[0])}, {type_text(args[1])}]" if args else "mapping"
    nested = nested_model(annotation)
    if nested is not None:
        return "mapping"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def default_of(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if nested_model(type(value)) is not None:
            return "(its keys' defaults)"
        return code(yaml_text(value))
    if field.default is PydanticUndefined:
        return ""
    return code(yaml_text(field.default))


def yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return str(value)


def limits(field: Any) -> str:
    words = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤"}
    found = []
    for item in field.metadata:
        for attr, word in words.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{word} {value}")
    return ", ".join(found)


def field_comments(model: type) -> dict[str, str]:
    """``#:`` comments above each field of a class (the Sphinx convention the code uses)."""
    try:
        source, _ = inspect.getsourcelines(model)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            comments[match[1]] = " ".join(pending)
        pending = []
    return comments


# --------------------------------------------------------------------------- the GitHub Action


def action_tables(path: Path) -> str:
    import yaml

    action = yaml.safe_load(path.read_text())
    rows = ["| input | meaning | default |", "|---|---|---|"]
    for name, spec in (action.get("inputs") or {}).items():
        default = spec.get("default")
        shown = code(default) if default not in (None, "") else ""
        required = " (required)" if spec.get("required") else ""
        rows.append(f"| {code(name)}{required} | {cell(spec.get('description', ''))} | {shown} |")
    rows += ["", "| output | meaning |", "|---|---|"]
    for name, spec in (action.get("outputs") or {}).items():
        rows.append(f"| {code(name)} | {cell(spec.get('description', ''))} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- errors


def errors_table(markdown: str, page: str) -> str:
    from loraship import errors

    classes = [
        cls
        for cls in vars(errors).values()
        if inspect.isclass(cls) and issubclass(cls, errors.LorashipError) and cls.__module__ == errors.__name__
    ]
    rows = ["| error | title in messages | exit code | what it means |", "|---|---|---|---|"]
    for cls in classes:
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        doc = rst_to_markdown(doc)
        link = f"[`{cls.__name__}`](#{cls.__name__.lower()})"
        rows.append(f"| {link} | {cell(cls.title)} | {cls.exit_code} | {cell(doc)} |")
        if not re.search(rf"^###\s+`?{cls.__name__}`?\s*$", markdown, re.M):
            log.warning(f"docs/{page}: loraship.errors.{cls.__name__} has no `### {cls.__name__}` section: add one.")
    return "\n".join(rows)
