"""A griffe extension: Sphinx roles in the docstrings (``:class:`~sasha_env.x.Y```) as Markdown.

The code's docstrings are Google style with Sphinx cross-reference roles. A role whose target
is a full ``sasha_env.`` / ``sasha_models.`` path becomes an autorefs link (checked by the
strict build); a relative target becomes plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:class|meth|func|mod|attr|data|obj|exc|const):`(~?)([^`<>]+?)(?:\s*<([^`>]+)>)?`"
)


def _markdown(match: re.Match[str]) -> str:
    tilde, text, explicit = match.group(1), match.group(2).strip(), match.group(3)
    target = (explicit or text).lstrip("~").strip()
    shown = target.rsplit(".", 1)[-1] if tilde else text.lstrip("~")
    if target.startswith(("sasha_env.", "sasha_models.")):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles before the docstrings are parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_markdown, obj.docstring.value)
