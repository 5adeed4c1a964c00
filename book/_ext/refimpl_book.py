"""Sphinx extension of the refimpl book: the built HTML needs no network.

* MathJax 3 is served from the build: the files of the ``sphinx-mathjax-offline`` package (a
  plain copy of MathJax's ``es5`` folder) are copied to ``_static/mathjax`` and ``mathjax_path``
  in ``_config.yml`` points there. The SVG output is used, so no web font has to be loaded either,
  which also works for a page opened from disk (``file://``).
* The thebe loader that Jupyter Book always adds (a script constant naming a CDN URL, used only
  by live-code buttons that this book does not have) is dropped from every page.
* The API reference (``refimpl-automodules``) documents every module of the package from its
  docstrings. Docstrings are written for ``help()`` first: a name in one that is not documented
  in this book (a NumPy type, a shape note that napoleon reads as a type) is shown as plain text
  instead of failing ``--nitpick``, a short name is linked when exactly one documented object has
  it, and a docstring that is not valid reStructuredText is shown verbatim (and listed in the build
  log) instead of breaking the page. Cross-references everywhere else stay strict.
* ``refimpl-run-times`` renders the run time of every page executed in this build (myst-nb's
  execution statistics, the same data as its ``nb-exec-table``) as a table of chapter titles
  with a total, for the intro page.
* After the build, every HTML page and stylesheet is scanned: a script, stylesheet, font, image
  or frame loaded from another host is reported as a warning, which ``--warningiserror`` turns
  into a failed build. Ordinary links (``<a href="https://...">``) are not loads and are allowed.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.addnodes import pending_xref
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.fileutil import copy_asset
from sphinx.util.nodes import make_refnode, nested_parse_with_titles

logger = logging.getLogger(__name__)

MATHJAX_PACKAGE = "sphinx-mathjax-offline"
# elements whose src/href the browser fetches by itself (an <a href> is only followed on a click)
_LOADING_TAG = re.compile(
    r"<(?:script|img|iframe|source|video|audio|embed|track)\b[^>]*?\bsrc\s*=\s*[\"']?((?:https?:)?//[^\"'\s>]+)"
    r"|<link\b[^>]*?\bhref\s*=\s*[\"']?((?:https?:)?//[^\"'\s>]+)",
    re.IGNORECASE,
)
_INLINE_SCRIPT = re.compile(r"<script\b[^>]*>(.*?)</script>", re.IGNORECASE | re.DOTALL)
_CSS_REMOTE = re.compile(r"(?:url\(\s*[\"']?|@import\s+[\"'])((?:https?:)?//[^\"')\s]+)", re.IGNORECASE)
_URL_IN_SCRIPT = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", re.IGNORECASE)


def mathjax_source_dir() -> Path:
    """The folder of MathJax 3 files shipped by the ``sphinx-mathjax-offline`` package."""
    spec = importlib.util.find_spec(MATHJAX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{MATHJAX_PACKAGE} is not installed: pip install -e '.[book]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax"
    if not (folder / "tex-svg.js").is_file():
        raise RuntimeError(f"{folder} has no tex-svg.js")
    return folder


def _is_thebe(script) -> bool:
    filename = getattr(script, "filename", None) or ""
    body = getattr(script, "attributes", {}).get("body", "") or ""
    return filename.endswith("sphinx-thebe.js") or "THEBE_JS_URL" in body


def drop_thebe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [s for s in scripts if not _is_thebe(s)]


def remote_loads(html: str) -> list[str]:
    """The URLs on other hosts that a page would fetch by itself (scripts, styles, images, ...)."""
    found = [a or b for a, b in _LOADING_TAG.findall(html)]
    for body in _INLINE_SCRIPT.findall(html):
        found += _URL_IN_SCRIPT.findall(body)
    return found


def copy_mathjax_and_check(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    copy_asset(str(mathjax_source_dir()), str(out / "_static" / "mathjax"))
    for page in sorted(out.rglob("*.html")):
        for url in remote_loads(page.read_text(encoding="utf-8", errors="replace")):
            logger.warning("%s loads %s from the network; the book must render offline",
                           page.relative_to(out), url)
    for sheet in sorted((out / "_static").rglob("*.css")):
        for url in _CSS_REMOTE.findall(sheet.read_text(encoding="utf-8", errors="replace")):
            logger.warning("%s loads %s from the network; the book must render offline",
                           sheet.relative_to(out), url)


def module_names(name: str, exclude: str | None = None) -> list[str]:
    """``name`` and, for a package, all its submodules (sorted), minus those matching ``exclude``."""
    module = importlib.import_module(name)
    names = [name]
    if hasattr(module, "__path__"):
        names += sorted(m.name for m in pkgutil.walk_packages(module.__path__, name + "."))
    if exclude:
        names = [n for n in names if not re.fullmatch(exclude, n)]
    return names


class AutoModules(SphinxDirective):
    """``refimpl-automodules`` PKG: an ``automodule`` for the package and every submodule.

    The submodules are found by import, so a module added to the package appears in the API
    reference without editing the page. A package is documented by its docstring and what its
    ``__init__`` itself defines (``:ignore-module-all:``: the names it re-exports are documented
    once, in the module that defines them). Options: ``:exclude:`` (a regular expression on full
    module names) and ``:sections:`` (one section per top-level module or subpackage,
    ``refimpl.core``, ``refimpl.moe``, ..., listed in the page's table of contents).
    """

    required_arguments = 1
    option_spec = {"exclude": directives.unchanged, "sections": directives.flag}

    def run(self):
        names = module_names(self.arguments[0], self.options.get("exclude"))
        if "sections" not in self.options:
            return self._automodules(names)
        groups: dict[str, list[str]] = {}
        for name in names:  # one section per top-level package or module: refimpl.core, refimpl.moe, ...
            groups.setdefault(".".join(name.split(".")[:2]), []).append(name)
        out = []
        for title, members in groups.items():
            section = nodes.section(ids=[nodes.make_id("api-" + title)], names=[nodes.fully_normalize_name(title)])
            section += nodes.title(text=title)
            self.state.document.note_implicit_target(section, section)
            section += self._automodules(members)
            out.append(section)
        return out

    def _automodules(self, names):
        lines = []
        for name in names:
            lines += [f".. automodule:: {name}", "   :members:", "   :ignore-module-all:", ""]
        content = StringList(lines, source=f"<refimpl-automodules {self.arguments[0]}>")
        container = nodes.container()
        nested_parse_with_titles(self.state, content, container)
        return container.children


API_DOC = "api"
_unlinked: set[str] = set()
_verbatim: set[str] = set()


def resolve_api_reference(app, env, node, contnode):
    """In the API page only: link a short name to the one documented object with that name, else plain text."""
    if node.get("refdomain") != "py" or node.get("refdoc") != API_DOC:
        return None
    target = node["reftarget"].lstrip(".~")
    objects = env.get_domain("py").objects
    hits = [name for name in objects if name == target or name.endswith("." + target)]
    if len(hits) == 1:
        entry = objects[hits[0]]
        return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, hits[0])
    _unlinked.add(target)
    return contnode


def _rst_problems(text: str, source: str, env) -> list[str]:
    """docutils' complaints (level >= warning) about ``text`` parsed alone as reStructuredText."""
    from docutils.core import publish_doctree
    from docutils.utils import SystemMessage

    settings = {"report_level": 2, "halt_level": 5, "warning_stream": False, "file_insertion_enabled": False,
                "raw_enabled": False, "env": env}  # Sphinx's roles (:func:, :math:) read settings.env
    try:
        tree = publish_doctree(text, source_path=source, settings_overrides=settings)
    except SystemMessage as exc:  # pragma: no cover - halt_level 5 never halts
        return [str(exc)]
    return [m.astext() for m in tree.findall(nodes.system_message) if m["level"] >= 2]


def verbatim_if_invalid(app, what, name, obj, options, lines):
    """Show a docstring verbatim when it is not valid reStructuredText (after napoleon's rewrite)."""
    if not lines or not name.startswith("refimpl"):
        return
    problems = _rst_problems("\n".join(lines), f"docstring of {name}", app.env)
    if problems:
        _verbatim.add(name)
        logger.info("[refimpl_book] docstring of %s shown verbatim: %s", name, problems[0].splitlines()[0])
        original = (getattr(obj, "__doc__", None) or "").expandtabs().splitlines()
        lines[:] = ["::", ""] + ["    " + line for line in _dedent(original)] + [""]


def _dedent(lines: list[str]) -> list[str]:
    import textwrap

    if not lines:
        return lines
    return [lines[0].strip()] + textwrap.dedent("\n".join(lines[1:])).splitlines()


def report_api(app, exc):
    if _verbatim:
        logger.info("[refimpl_book] %d docstring(s) are not valid reStructuredText and are shown verbatim in "
                    "the API reference: %s", len(_verbatim), ", ".join(sorted(_verbatim)))
    if _unlinked:
        logger.info("[refimpl_book] %d name(s) in docstrings are not documented here and are shown unlinked",
                    len(_unlinked))


class RunTimesNode(nodes.General, nodes.Element):
    """Placeholder for the run-time table, filled in once every page has been executed."""


class RunTimes(SphinxDirective):
    """``refimpl-run-times``: how long each executed page of this build took to run."""

    def run(self):
        from myst_nb.ext.execution_tables import METADATA_KEY
        from myst_nb.sphinx_ import NbMetadataCollector

        # the same flag as myst-nb's nb-exec-table: this page is rewritten whenever a notebook re-executes
        NbMetadataCollector.set_doc_data(self.env, self.env.docname, METADATA_KEY, True)
        return [RunTimesNode()]


def _cell(content) -> nodes.entry:
    para = nodes.paragraph()
    para += content if isinstance(content, nodes.Node) else nodes.Text(content)
    return nodes.entry("", para)


def run_time_table(env, docname: str) -> nodes.table:
    from myst_nb.sphinx_ import NbMetadataCollector

    rows = []
    for name, data in sorted(NbMetadataCollector.get_doc_data(env).items()):
        stats = data.get("exec_data")
        if stats:
            rows.append((name, stats.get("runtime"), stats.get("succeeded")))
    table = nodes.table(classes=["colwidths-auto"])
    group = nodes.tgroup(cols=3)
    table += group
    for width in (60, 20, 20):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    head += nodes.row("", *(_cell(t) for t in ("Page", "Run time (s)", "Result")))
    body = nodes.tbody()
    group += body
    total = 0.0
    for name, runtime, ok in rows:
        title = env.titles[name].astext() if name in env.titles else name
        link = pending_xref("", refdoc=docname, reftarget="/" + name, reftype="doc", refdomain="std",
                            refexplicit=True, refwarn=True)
        link += nodes.inline(text=title)
        total += runtime or 0.0
        body += nodes.row("", _cell(link), _cell("-" if runtime is None else f"{runtime:.1f}"),
                          _cell("ran" if ok else "failed"))
    body += nodes.row("", _cell(nodes.strong(text="All pages")), _cell(nodes.strong(text=f"{total:.1f}")),
                      _cell(""))
    return table


class RunTimesTransform(SphinxPostTransform):
    default_priority = 8  # before the references are resolved (10)

    def run(self, **kwargs):
        for node in list(self.document.findall(RunTimesNode)):
            node.replace_self(run_time_table(self.env, self.env.docname))


def setup(app):
    mathjax_source_dir()  # fail early, with the fix in the message, if the package is missing
    app.setup_extension("sphinx.ext.autodoc")
    app.add_directive("refimpl-automodules", AutoModules)
    app.add_node(RunTimesNode)
    app.add_directive("refimpl-run-times", RunTimes)
    app.add_post_transform(RunTimesTransform)
    app.connect("missing-reference", resolve_api_reference)
    app.connect("autodoc-process-docstring", verbatim_if_invalid, priority=900)  # after napoleon (500)
    app.connect("build-finished", report_api)
    app.connect("html-page-context", drop_thebe, priority=900)
    app.connect("build-finished", copy_mathjax_and_check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
