"""The layout: the root holds what a user runs and what travels to the Hub; the library is the `toygpt` package.
Data flows one way (text -> tokens -> windows -> model -> checkpoint -> model dir -> int8 dir -> Hub -> Space), no
module imports one further down that flow, no library module imports a command, and the files that travel to the
Hub import only each other."""

import ast

from conftest import REPO

# Each module's step in the data flow; a module may import modules of its own step or earlier ones.
# Root modules by their file name, package modules as "toygpt.<name>".
FLOW = {
    "toygpt.corpus": 0, "toygpt.text_files": 0, "toygpt.dataset_source": 0,  # text (a file, files, a dataset's rows)
    "toygpt.file_modes": 0,  # the user's umask for what any step writes
    "toygpt.errors": 0, "toygpt.defaults": 0,  # the error base class; train.py's defaults, torch-free
    "toygpt.progress": 0, "toygpt.summary": 0,  # any step's progress bars and closing summary
    "toygpt.bpe": 1, "toygpt.sources": 1,  # tokens (a source's text, checked, as tokens)
    "toygpt.stream": 2,  # windows
    "configuration_toygpt": 3, "int8_toygpt": 3, "modeling_toygpt": 3,  # model
    "toygpt.training_loss": 3, "toygpt.distributed": 3, "toygpt.evaluation": 3, "toygpt.optim": 3,
    "toygpt.run_log": 3, "toygpt.tracking": 3, "toygpt.corpus_vocab": 3, "toygpt.regularization": 3,
    "toygpt.weight_average": 3,
    "toygpt.checkpoint": 4, "toygpt.best_model": 4,  # checkpoint (and the best weights beside it)
    "toygpt.model_dir": 5, "toygpt.model_card": 5, "toygpt.train_config": 5,  # model dir
    "toygpt.training": 5,  # the training loop: a checkpoint becomes a model dir
    "toygpt.gguf_export": 5, "toygpt.init_from": 5, "toygpt.gpt2_conversion": 5, "toygpt.hub_errors": 5,
    "train": 5, "convert_gpt2": 5,
    "toygpt.quantization": 6, "quantize": 6,  # int8 dir
    "push_to_hub": 7, "toygpt.hub_push": 7,  # Hub
}
COMMANDS = {"train", "quantize", "push_to_hub", "convert_gpt2"}
REMOTE_CODE = {"configuration_toygpt", "int8_toygpt", "modeling_toygpt"}
ROOT = COMMANDS | REMOTE_CODE


def path_of(name):
    return REPO / (name.replace(".", "/") + ".py")


def project_imports(path):
    """Modules of FLOW imported anywhere in `path` (top level, inside functions, relative or not)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import: within the package, or beside the remote-code files
                base = "toygpt" if path.parent.name == "toygpt" else ""
                module = ".".join(filter(None, [base, node.module]))
            else:
                module = node.module or ""
            names |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return {name for name in names if name in FLOW}


def test_every_module_has_a_place_in_the_flow():
    modules = {p.stem for p in REPO.glob("*.py")} | {f"toygpt.{p.stem}" for p in (REPO / "toygpt").glob("*.py")}
    assert modules - {"toygpt.__init__"} == set(FLOW)


def test_the_root_holds_only_the_commands_and_the_remote_code():
    assert {p.stem for p in REPO.glob("*.py")} == ROOT


def test_no_module_imports_one_further_down_the_data_flow():
    backwards = {name: sorted(i for i in project_imports(path_of(name)) if FLOW[i] > FLOW[name]) for name in FLOW}
    assert {name: found for name, found in backwards.items() if found} == {}


def test_no_library_module_imports_a_command():
    offenders = {name: sorted(project_imports(path_of(name)) & COMMANDS) for name in FLOW if name.startswith("toygpt.")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_remote_code_files_import_only_each_other():
    for name in REMOTE_CODE:
        assert project_imports(path_of(name)) <= REMOTE_CODE, name


def test_the_space_is_self_contained():
    """A Space is deployed alone: space/app.py imports pip packages only."""
    assert project_imports(REPO / "space" / "app.py") == set()
