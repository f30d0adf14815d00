"""The notebook's form, as the project's rules and its own prose say it is: `#| export` cells only import
and define, code cells are short, section links resolve, and the distances its closing note gives are
the notebook's. Read from the committed file's JSON; nothing is executed."""
import ast
import json
import re
import statistics
from pathlib import Path

from nbloader import is_export

NOTEBOOK = Path(__file__).resolve().parent.parent / "dino_vit.ipynb"
CELLS = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


def source(cell):
    return "".join(cell["source"])


def cell(cell_id):
    return next(c for c in CELLS if c.get("id") == cell_id)


def code_cells():
    return [c for c in CELLS if c["cell_type"] == "code"]


def export_cells():
    return [c for c in code_cells() if is_export(source(c))]


def is_guarded_import(node):
    """`try: import x` / `except ...: raise ...`: an import that says what to do where it fails."""
    return (isinstance(node, ast.Try) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body)
            and all(isinstance(s, ast.Raise) for h in node.handlers for s in h.body)
            and not node.orelse and not node.finalbody)


def test_export_cells_only_import_and_define():
    exported = export_cells()
    assert len(exported) > 50   # the tests, benchmarks and torchrun load these
    work = [(c["id"], type(node).__name__, node.lineno) for c in exported for node in ast.parse(source(c)).body
            if not isinstance(node, DEFINITIONS) and not is_guarded_import(node)]
    assert work == [], f"statements that do work in #| export cells (cell, kind, line): {work}"
    assert all(source(c).splitlines()[0] == "#| export" for c in exported)


# what a constant's value may call in an #| export cell: builders of containers, patterns and names, each
# cheap; anything else (a tensor, a file, a model) would be work done on every load of the cells
CONSTANT_CALLS = {"dict", "tuple", "set", "frozenset", "range", "getattr", "re.compile",
                  "Image.registered_extensions", "Image.registered_extensions().items", "_decodes"}


def test_export_constants_call_only_cheap_builders():
    calls = {(c["id"], ast.unparse(call.func)) for c in export_cells() for node in ast.parse(source(c)).body
             if isinstance(node, (ast.Assign, ast.AnnAssign)) for call in ast.walk(node) if isinstance(call, ast.Call)}
    assert {name for _, name in calls} >= {"dict", "re.compile"}   # the walk sees calls where there are some
    unexpected = sorted((cell_id, name) for cell_id, name in calls if name not in CONSTANT_CALLS)
    assert unexpected == [], f"calls in the constants of #| export cells (cell, call): {unexpected}"


def test_code_cells_are_short():
    lengths = {c["id"]: len(source(c).splitlines()) for c in code_cells()}
    too_long = {cell_id: n for cell_id, n in lengths.items() if n > 60}
    assert too_long == {}, f"code cells of more than 60 lines: {too_long}"
    assert statistics.median(lengths.values()) <= 21   # the brief: about 20


def missing_names(cell_source):
    """The names a cell sets to `Missing(...)`: what it makes, undone before it makes it again."""
    return {name.id for node in ast.walk(ast.parse(cell_source)) if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "Missing"
            for target in node.targets for name in ast.walk(target) if isinstance(name, ast.Name)}


def test_the_settings_cell_undoes_everything_made_under_other_settings():
    """Changed settings and the Setup cells run again, then a later cell read what a section had made under the
    old ones: the evaluation table printed the old teacher's k-NN under the new teacher's name."""
    made = {cell_id: missing_names(source(c)) for c in code_cells() if (cell_id := c.get("id")) != "cell-012"}
    assert len([names for names in made.values() if names]) >= 5   # the sections' first cells, the Train cell
    left = {cell_id: sorted(names - missing_names(source(cell("cell-012")))) for cell_id, names in made.items()}
    assert {cell_id: names for cell_id, names in left.items() if names} == {}


def test_a_figure_of_the_evaluated_teacher_is_saved_as_that_teachers():
    """A figure titled with the evaluated file's model (`model_label(cfg, teacher_file)`) is saved with that
    file, so that another file's figures go to models/<file>/ and never replace the run's own."""
    drawn = [c["id"] for c in code_cells() if "model_label(cfg, teacher_file)" in source(c) and "save_figure(" in source(c)]
    assert len(drawn) >= 5   # retrieval, patch colours, three attention figures
    calls = [(cell_id, ast.unparse(call)) for cell_id in drawn for call in ast.walk(ast.parse(source(cell(cell_id))))
             if isinstance(call, ast.Call) and ast.unparse(call.func) == "save_figure"]
    assert [(cell_id, call) for cell_id, call in calls if "teacher_file=teacher_file" not in call] == []


def anchor(heading):
    """Jupyter's anchor of a markdown heading: its rendered text (no code or emphasis marks), spaces as
    hyphens."""
    return re.sub(r"[`*]", "", heading).strip().replace(" ", "-")


def test_section_links_resolve():
    markdown = [source(c) for c in CELLS if c["cell_type"] == "markdown"]
    anchors = {anchor(m) for text in markdown for m in re.findall(r"^#+ (.+)$", text, re.M)}
    links = {link for text in markdown for link in re.findall(r"\]\(#([^)]+)\)", text)}
    assert len(links) >= 5
    assert links - anchors == set(), f"links to no heading: {sorted(links - anchors)}"


def reading_order():
    """(cell, skipping_below) for every cell in order: skipping_below is the heading level of the *Under the
    hood* subsection the cell lies in, None outside one; a subsection is the cells from a cell that opens
    with its heading to the next heading of its level or above."""
    skipping_below = None
    for c in CELLS:
        heading = re.match(r"(#+) (.*)", source(c)) if c["cell_type"] == "markdown" else None
        if heading:
            level = len(heading.group(1))
            if skipping_below is not None and level <= skipping_below:
                skipping_below = None
            if skipping_below is None and "Under the hood" in heading.group(2):
                skipping_below = level
        yield c, skipping_below


def distances(stop_ids):
    """{cell id: (words, code lines) before it for a reader who skips every *Under the hood* subsection and
    folded code cell, (the same) for one who reads everything}: words are runs of letters and digits in
    markdown cells."""
    seen, counts = {}, dict(words=0, lines=0, all_words=0, all_lines=0)
    for c, skipping_below in reading_order():
        text = source(c)
        if c.get("id") in stop_ids:
            seen[c["id"]] = ((counts["words"], counts["lines"]), (counts["all_words"], counts["all_lines"]))
        folded = c["metadata"].get("jupyter", {}).get("source_hidden", False)
        kind, n = ("words", len(re.findall(r"\w+", text))) if c["cell_type"] == "markdown" else \
            ("lines", len(text.splitlines()))
        counts["all_" + kind] += n
        if skipping_below is None and not folded:
            counts[kind] += n
    return seen


def without_code(markdown):
    """Markdown without its fenced code blocks, whose comments look like headings."""
    return re.sub(r"```.*?```", "", markdown, flags=re.S)


def test_subsections_open_their_cells():
    """reading_order() sees a cell's first line only: a heading further down must neither open an *Under
    the hood* subsection nor end the one it lies in, or the skipping reader's distances would be wrong."""
    inner = [(c["id"], skipping_below, m.group(1), m.group(2)) for c, skipping_below in reading_order()
             if c["cell_type"] == "markdown" for m in re.finditer(r"^(#+) (.*)$", without_code(source(c)), re.M)
             if m.start() > 0]
    assert len(inner) >= 2   # the loss section's cell holds two
    wrong = [(cell_id, heading) for cell_id, skipping_below, hashes, heading in inner
             if "Under the hood" in heading or (skipping_below is not None and len(hashes) <= skipping_below)]
    assert wrong == [], f"headings that are not their cell's first line but open or end a subsection: {wrong}"


def figures(text):
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\d|\d", text)]


def test_the_distances_the_closing_note_gives_are_the_notebooks():
    loss_id = next(c["id"] for c in code_cells() if "class DINOLoss" in source(c))
    train_id = next(c["id"] for c in code_cells() if re.search(r"^trainer, history = train_dino", source(c), re.M))
    counted = distances({loss_id, train_id})
    note = source(cell("i25-distances"))
    said = figures(note[note.index("comes after"):note.index("Before the engineering")])
    expected = [n for cell_id in (loss_id, train_id) for pair in counted[cell_id] for n in pair]
    assert len(said) == len(expected) == 8
    for s, e in zip(said, expected):   # the note rounds (to hundreds of words, tens of lines), so 2% at most
        assert abs(s - e) <= 0.02 * e, f"the note says {s}, the notebook counts {e}: {said} against {expected}"


def test_under_the_hood_opens_collapsed_with_its_definitions_folded():
    """The opening cell says JupyterLab opens every *Under the hood* subsection collapsed, with the cells
    that only define folded: each such heading carries JupyterLab's collapsed flag, each `#| export` cell
    inside one its folded-source flag."""
    headings, definitions = [], []
    for c, skipping_below in reading_order():
        opens = c["cell_type"] == "markdown" and re.match(r"#+ Under the hood", source(c))
        if opens and skipping_below is not None:
            headings.append((c["id"], c["metadata"].get("jp-MarkdownHeadingCollapsed", False)))
        if skipping_below is not None and c["cell_type"] == "code" and is_export(source(c)):
            definitions.append((c["id"], c["metadata"].get("jupyter", {}).get("source_hidden", False)))
    assert len(headings) >= 20 and len(definitions) >= 40
    assert [i for i, collapsed in headings if not collapsed] == [], "Under the hood headings not collapsed"
    assert [i for i, folded in definitions if not folded] == [], "definitions not folded in Under the hood"
