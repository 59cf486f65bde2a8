"""The layout: data flows one way (text -> tokens -> windows -> model -> checkpoint -> model dir -> int8 dir -> Hub ->
Space), no module imports one further down that flow, and the files that travel to the Hub import only each other."""

import ast

from conftest import REPO

# Each project module's step in the data flow; a module may import modules of its own step or earlier ones.
FLOW = {
    "corpus": 0, "dataset_source": 0,  # text (a file, files, a dataset's rows)
    "file_modes": 0,  # the user's umask for what any step writes
    "bpe": 1,  # tokens
    "data": 2,  # windows
    "configuration_toygpt": 3, "int8_toygpt": 3, "modeling_toygpt": 3,  # model
    "training_loss": 3, "distributed": 3, "evaluation": 3, "optim": 3, "run_log": 3, "corpus_vocab": 3,
    "checkpoint": 4,  # checkpoint
    "model_dir": 5, "model_card": 5, "train": 5, "train_args": 5,  # model dir
    "convert_gpt2": 5, "gguf_export": 5, "init_from": 5,
    "quantize": 6,  # int8 dir
    "push_to_hub": 7,  # Hub
}
REMOTE_CODE = {"configuration_toygpt", "int8_toygpt", "modeling_toygpt"}


def project_imports(path):
    """Names of project modules imported anywhere in `path` (top level, inside functions, relative or not)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(FLOW)


def test_every_top_level_module_has_a_place_in_the_flow():
    assert {p.stem for p in REPO.glob("*.py")} == set(FLOW)


def test_no_module_imports_one_further_down_the_data_flow():
    backwards = {
        name: sorted(i for i in project_imports(REPO / f"{name}.py") if FLOW[i] > FLOW[name]) for name in FLOW
    }
    assert {name: found for name, found in backwards.items() if found} == {}


def test_remote_code_files_import_only_each_other():
    for name in REMOTE_CODE:
        assert project_imports(REPO / f"{name}.py") <= REMOTE_CODE, name


def test_the_space_is_self_contained():
    """A Space is deployed alone: space/app.py imports pip packages only."""
    assert project_imports(REPO / "space" / "app.py") == set()
