"""Prometheus rule files as readable YAML: comments kept, expressions as blocks.

yaml.safe_dump would drop the comments that say why a rule is what it is, and fold long PromQL
into quoted strings. `render` writes the file by hand and proves it reads back as the same data.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import yaml

WIDTH = 100
FOLDED = {"description"}  # prose; a URL or a summary stays on its one line
TEMPLATE = re.compile(r"\{\{.*?\}\}")
NBSP = "\u00a0"


@dataclass(frozen=True)
class Rule:
    """A recording rule (`record`) or an alert (`alert`); `comment` says why, above it."""

    expr: str
    record: str | None = None
    alert: str | None = None
    comment: str = ""
    for_: str | None = None
    keep_firing_for: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"record": self.record} if self.record else {"alert": self.alert}
        out["expr"] = self.expr
        if self.for_:
            out["for"] = self.for_
        if self.keep_firing_for:
            out["keep_firing_for"] = self.keep_firing_for
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Group:
    name: str
    rules: list[Rule]
    comment: str = ""


def _scalar(value: str) -> str:
    """Plain where YAML reads it back unchanged, else double-quoted (JSON is valid YAML)."""
    try:
        if yaml.safe_load(f"k: {value}") == {"k": value}:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value, ensure_ascii=False)


def _comment(text: str, indent: str) -> list[str]:
    width = WIDTH - len(indent) - 2
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), width)]


def _block(key: str, text: str, indent: str) -> list[str]:
    """PromQL as a literal block (newlines kept); prose as a folded one (wrapped, joined)."""
    inner = indent + "  "
    if "\n" in text.strip():
        lines = textwrap.dedent(text).strip("\n").splitlines()
        return [f"{indent}{key}: |", *(f"{inner}{line}".rstrip() for line in lines)]
    single = f"{indent}{key}: {_scalar(text)}"
    if len(single) <= WIDTH or key not in FOLDED:
        return [single]
    # a template's {{ $labels.x }} stays on one line
    kept = TEMPLATE.sub(lambda m: m.group(0).replace(" ", NBSP), text)
    wrapped = textwrap.wrap(kept, WIDTH - len(inner), break_on_hyphens=False)
    return [f"{indent}{key}: >-", *(f"{inner}{line.replace(NBSP, ' ')}" for line in wrapped)]


def render(groups: list[Group], header: str) -> str:
    lines = [f"# {line}".rstrip() for line in header.strip("\n").splitlines()]
    lines.append("groups:")
    for group in groups:
        lines += _comment(group.comment, "  ")
        lines += [f"  - name: {group.name}", "    rules:"]
        for i, rule in enumerate(group.rules):
            if i and (rule.comment or rule.alert):
                lines.append("")
            lines += _comment(rule.comment, "      ")
            data = rule.data()
            first = True
            for key, value in data.items():
                indent = "      - " if first else "        "
                first = False
                if isinstance(value, dict):
                    lines.append(f"{indent}{key}:")
                    for k, v in value.items():
                        lines += _block(k, v, "          ")
                elif key == "expr":
                    block = _block(key, value, "        ")
                    lines += [indent + block[0].lstrip(), *block[1:]]
                else:
                    lines.append(f"{indent}{key}: {_scalar(value)}")
    text = "\n".join(lines) + "\n"
    wanted = {"groups": [{"name": g.name, "rules": [r.data() for r in g.rules]} for g in groups]}
    read = yaml.safe_load(text)
    # a folded or literal block reads back with its line breaks normalised: compare like that
    if _normalised(read) != _normalised(wanted):
        raise ValueError(f"the rule file does not read back as written:\n{text}")
    return text


def _normalised(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _normalised(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalised(v) for v in node]
    if isinstance(node, str):
        return " ".join(node.split())
    return node
