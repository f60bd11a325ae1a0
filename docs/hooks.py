"""mkdocs hook: render the Sphinx cross-reference roles used in docstrings as plain code.

The docstrings use ``:func:`name``` and friends; mkdocstrings' Google-style parser keeps the role
prefix as text. Strip it (and a leading ``~``, which in Sphinx means "show the last component").
"""

import re

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_plain, html)
