"""push_to_hub.py's work: check both model dirs, stage the model repo and the Space exactly as they will be uploaded,
then upload each staged tree as one commit with HfApi.upload_folder (a --dry-run shows exactly the bytes a push
sends).

Both trees are staged first (training leftovers dropped, the Space's model id written in, the model cards rendered by
toygpt/model_card.py from the records the dirs hold, their load snippets naming the repo; beside the fp32 weights a
q8_0 GGUF file, toygpt/gguf_export.py). Re-running is safe: existing repos are reused and unchanged files are skipped.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from toygpt import bpe
from toygpt import model_card
from toygpt import quantization
from toygpt.dataset_source import file_sha256
from toygpt.errors import ToyGPTError, UsageError
from toygpt.gguf_export import write_gguf
from toygpt.hub_errors import describe_hub_error, hub_errors
from toygpt.train_config import TrainingConfig
from toygpt.model_card import GGUF_TYPE, INT8_SUBFOLDER, TRAINING_ARGS, FolderSizes, GgufFile, gguf_filename, human_size
from toygpt.model_dir import ModelDirError, OutputDir, check_model_dir, load_pretrained

SPACE_DIR = Path(__file__).resolve().parents[1] / "space"
STAGE_MARKER = ".toygpt-stage"  # written into every --dry-run stage: the only directory a later --dry-run replaces
# Never uploaded: resumable checkpoints, pickled tensors (safetensors only), caches, hidden and temp files, and GGUF
# files a dir may hold (the staged one is written from the weights being pushed). TensorBoard's runs/ is uploaded:
# the Hub shows its event files as the repo's training metrics.
EXCLUDE = ["checkpoint*", "__pycache__", ".*", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.tmp", "*.lock",
           "wandb", "flagged", ".gradio", "*.gguf"]
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
LOGIN_HELP = (
    "log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN to a write token "
    "from https://huggingface.co/settings/tokens; --dry-run DIR stages the upload without a token"
)
# The tokenizer check's text: punctuation, digits, repeated spaces, non-ASCII (accents, CJK, emoji), newlines.
TOKENIZER_SAMPLE = ("ROMEO:\nO Romeo, Romeo! wherefore art thou Romeo?\n"
                    "  It's 3.14 (or 22/7) -- isn't it? 100% sure; x=[1, 2]...\n"
                    "Café, naïve, Straße, “quoted” — 日本語, emoji 🙂.\n")


class PushError(ToyGPTError):
    """A push that did not finish: the message says what reached the Hub and how to retry; exit status 1."""


# ----------------------------------------------------------------------------------------------------------------
# Checks: everything that can be known before touching the network


def check_repo_id(repo_id: str, flag: str) -> str:
    try:
        if not REPO_ID_RE.fullmatch(repo_id or ""):
            raise HFValidationError("expected exactly one '/' between a user (or org) name and a repo name")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(
            f"{flag} {repo_id!r} is not a valid Hub repo id ({err}). Use USER/NAME with letters, digits, '-', '_' "
            f"and '.', e.g. `{flag} alice/toygpt`."
        ) from None
    return repo_id


def require_token() -> str:
    token = get_token()  # HF_TOKEN, else the token `hf auth login` cached
    if not token:
        raise UsageError(f"No Hugging Face token found: {LOGIN_HELP}.")
    return token


def check_loadable(directory: Path, flag: str, quantized: bool):
    """ModelDirError checks + remote-code and tokenizer files present + model and tokenizer load with every weight.
    Returns the loaded model (the fp32 one is what the staged GGUF file is written from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    try:
        config = check_model_dir(directory)
    except ModelDirError as err:
        raise UsageError(f"{flag}: {err}") from None
    code_files = sorted({ref.split(".")[0] + ".py" for ref in config.get("auto_map", {}).values()})
    missing = [name for name in code_files + ["tokenizer_config.json"] if not (directory / name).is_file()]
    if missing:
        raise UsageError(
            f"{flag}: {directory} lacks {', '.join(missing)}, which from_pretrained(repo) needs; "
            "re-create the directory with train.py / quantize.py."
        )
    logging.disable_progress_bar()
    try:  # exactly what a user of the Hub repo runs; a failure here means the Hub copy would not load either
        model = load_pretrained(AutoModelForCausalLM, directory, where=str(directory), trust_remote_code=True,
                                fix="Re-create the directory with train.py / quantize.py.")
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    except ModelDirError as err:
        raise UsageError(f"{flag}: {err}") from None
    except Exception as err:
        raise UsageError(f"{flag}: the tokenizer in {directory} does not load ({type(err).__name__}: {err}).") from None
    check_tokenizer(tokenizer, directory, flag, config)
    if quantized and not config.get("quantization"):
        raise UsageError(f"{flag}: {directory} holds fp32 weights; pass the int8 dir written by quantize.py.")
    if not quantized and config.get("quantization"):
        raise UsageError(f"{flag}: {directory} holds int8 weights; pass it as --quantized-dir and the fp32 dir here.")
    return model


def check_tokenizer(tokenizer, directory: Path, flag: str, config: dict) -> None:
    """The tokenizer a Hub user gets must be the project's GPT-2 BPE: same ids as bpe.encode, and back to the text.

    Loading is not enough: without tokenizer.json, AutoTokenizer still loads, a 1-token tokenizer that encodes
    everything to [].
    """
    try:
        ids = list(tokenizer(TOKENIZER_SAMPLE, verbose=False)["input_ids"])
        text = tokenizer.decode(ids)
    except Exception as err:
        problem = f"fails on a sample text ({type(err).__name__}: {err})"
    else:
        expected = bpe.encode(TOKENIZER_SAMPLE)
        if ids != expected:
            problem = (f"is not the GPT-2 BPE: it encodes a sample text to {len(ids)} tokens, the GPT-2 BPE to "
                       f"{len(expected)} (vocabulary of {len(tokenizer)} tokens, GPT-2's has {bpe.VOCAB_SIZE})")
        elif text != TOKENIZER_SAMPLE:
            problem = f"does not decode a sample text back to itself (got {text[:40]!r}…)"
        else:
            return
    context = config.get("block_size", 1024)
    raise UsageError(
        f"{flag}: the tokenizer in {directory} {problem}; a Hub copy would tokenize wrongly. Re-create the directory "
        f"with train.py / quantize.py, or rewrite its tokenizer files from the ToyGPT checkout with "
        f"`python -c \"from toygpt import bpe; bpe.save_tokenizer('{directory.absolute()}', model_max_length={context})\"`."
    )


# ----------------------------------------------------------------------------------------------------------------
# Staging: the exact trees that get uploaded


def is_excluded(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in EXCLUDE)


def files_to_stage(src: Path) -> dict[Path, Path]:
    """{path inside the staged tree: the file to copy} of `src`, excluded names dropped. A symlink inside `src` is
    staged as the file it points to; one that leads out of `src` is refused, all of them named, before anything is
    staged or uploaded (a link to ../secret.txt must never reach the Hub)."""
    root, found, leaving, walked = src.resolve(), {}, [], {src.resolve()}
    for folder, dirs, names in os.walk(src, followlinks=True):
        folder = Path(folder)
        for name in [*dirs, *names]:
            path = folder / name
            relative = path.relative_to(src)
            if is_excluded(relative):
                continue
            real = path.resolve()
            if real != root and root not in real.parents:
                leaving.append(f"{relative} -> {real}")
            elif real.is_file():
                found[relative] = real
        inside = [d for d in dirs if not is_excluded((folder / d).relative_to(src))
                  and root in (folder / d).resolve().parents]  # links out are not walked
        dirs[:] = [d for d in inside if (folder / d).resolve() not in walked and not walked.add((folder / d).resolve())]
    if leaving:
        raise UsageError(f"{src} holds symbolic links that lead out of it ({'; '.join(leaving[:5])}"
                         f"{' …' if len(leaving) > 5 else ''}); nothing outside the directory is ever staged or "
                         "uploaded. Replace each link by a copy of the file, or remove it, and run again.")
    return found


def copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    for relative, source in sorted(files_to_stage(src).items()):
        if str(relative) not in skip:
            (dst / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dst / relative)


def files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def file_size(path: Path) -> int:
    return path.stat().st_size


def tree_size(directory: Path) -> int:
    return sum(map(file_size, files_in(directory)))


def folder_sizes(stage: Path) -> dict[str, FolderSizes]:
    """The files table of the model repo's card: the fp32 root ("", its card and GGUF file aside) and the int8
    subfolder."""
    int8_dir = stage / INT8_SUBFOLDER
    groups = {"": [p for p in files_in(stage)
                   if int8_dir not in p.parents and p != stage / "README.md" and p.suffix != ".gguf"]}
    if int8_dir.is_dir():
        groups[INT8_SUBFOLDER] = files_in(int8_dir)
    return {name: FolderSizes(file_size(stage / name / "model.safetensors"), len(files), sum(map(file_size, files)))
            for name, files in groups.items()}


def stage_model(model_dir: Path, repo_id: str, out: Path, quantized_dir: Path | None, space_id: str | None,
                model) -> None:
    """Both model dirs, their cards rendered from the records they hold, with load snippets naming the Hub repo;
    training_args.json names the training text by file name and sha256 instead of its local path. The GGUF file is
    written from `model`, the fp32 model check_loadable loaded from model_dir."""
    copy_tree(model_dir, out, skip=("README.md",))
    int8 = None
    if quantized_dir is not None:
        copy_tree(quantized_dir, out / INT8_SUBFOLDER, skip=("README.md",))
        int8 = model_card.read_records(out / INT8_SUBFOLDER)
    root = model_card.read_records(out)  # before the rewrite below: the cards name the input as before
    gone = {publishable_training_args(out / TRAINING_ARGS, model_dir / TRAINING_ARGS)}
    if quantized_dir is not None:
        gone.add(publishable_training_args(out / INT8_SUBFOLDER / TRAINING_ARGS, quantized_dir / TRAINING_ARGS))
        model_card.dir_card(int8, repo_id, INT8_SUBFOLDER).save(str(out / INT8_SUBFOLDER / "README.md"))
    for path, recorded in sorted(gone - {None}):
        hash_note = "its recorded input_sha256" if recorded else "input_sha256 null (hash unknown)"
        print(f"note: the training text {path} no longer exists; the pushed {TRAINING_ARGS} names it as "
              f"{Path(path).name!r} with {hash_note}.")
    gguf = out / gguf_filename(repo_id)
    write_gguf(model, model_dir, gguf, GGUF_TYPE)
    gguf = GgufFile(gguf.name, GGUF_TYPE.upper(), file_size(gguf))
    card = model_card.hub_card(root, repo_id, folder_sizes(out), int8, space_id, gguf)
    card.save(str(out / "README.md"))


def stage_space(repo_id: str, space_id: str, out: Path) -> None:
    """The project's space/ folder with the model id written in (model_id.txt, README `models:`)."""
    if not (SPACE_DIR / "app.py").is_file():
        raise PushError(f"{SPACE_DIR / 'app.py'} is missing; the Space cannot be pushed from this checkout.")
    copy_tree(SPACE_DIR, out, skip=("model_id.txt",))
    (out / "model_id.txt").write_text(repo_id + "\n")
    readme = out / "README.md"
    if readme.is_file():
        card = SpaceCard.load(readme)
    else:
        card = SpaceCard("---\ntitle: ToyGPT\nsdk: gradio\napp_file: app.py\n---\n\n# ToyGPT demo\n")
    card.data.models = [repo_id]
    # The README's snippets name the model and Space as MODEL_ID / SPACE_ID; fill in the real ids.
    card.text = card.text.replace("MODEL_ID", json.dumps(repo_id)).replace("SPACE_ID", json.dumps(space_id))
    card.save(str(readme))


def is_stage_dir(path: Path) -> bool:
    """A --dry-run stage this script wrote: its marker file, beside nothing but model/ and space/. Top-level names
    alone are not enough: a user's P/model/ folder of drafts looks the same."""
    return (path / STAGE_MARKER).is_file() and {p.name for p in path.iterdir()} <= {STAGE_MARKER, "model", "space"}


@dataclass(frozen=True)
class PushRequest:
    """What to push and where: push_to_hub.py's flags, typed."""

    model_dir: str  # fp32 model dir written by train.py
    repo_id: str  # the model repo, USER/NAME
    quantized_dir: str | None = None  # int8 model dir written by quantize.py: the repo's int8/ subfolder
    space_id: str | None = None  # also push the Gradio Space (space/) to this USER/NAME
    private: bool = False
    revision: str | None = None  # the model repo's branch (created if missing); None: main
    dry_run: str | None = None  # write STAGE_DIR/model and STAGE_DIR/space instead of uploading


def stage(request: PushRequest, out: Path, model) -> None:
    quantized_dir = Path(request.quantized_dir) if request.quantized_dir else None
    stage_model(Path(request.model_dir), request.repo_id, out / "model", quantized_dir, request.space_id, model)
    if request.space_id:
        stage_space(request.repo_id, request.space_id, out / "space")
    check_no_local_paths(out, request)


# ----------------------------------------------------------------------------------------------------------------
# No local paths: nothing uploaded may name a file on this machine


# Keys of training_args.json (and of its data_source) whose value is always a local path, relative or absolute.
PATH_KEYS = ("input", "output_dir")


def publishable_training_args(staged: Path, source: Path) -> tuple[str, bool] | None:
    """Rewrite a staged training_args.json: `input_path` (absolute, local) becomes `input_name` + `input_sha256`,
    and --input, --output-dir (as typed, even relative) and any other absolute path its file name. `input_sha256` is the
    one train.py recorded; only a file without one (older dirs) is hashed. Returns (the input path, whether a sha256
    was published) if it no longer exists (without a recorded hash, its hash is unknown: null), else None."""
    if not staged.is_file():
        return None
    try:
        args = json.loads(staged.read_text())
    except ValueError as err:
        raise UsageError(f"{source} is not valid JSON ({err}); re-create the directory with train.py / quantize.py, "
                         f"or delete that file (the cards then omit the training details).") from None
    if not isinstance(args, dict):
        raise UsageError(f"{source} holds no JSON object; re-create the directory with train.py / quantize.py.")
    published, gone = {}, None
    data = TrainingConfig.from_record(args).data
    for key, value in args.items():
        if key == "input_path" and isinstance(value, str):
            exists = Path(value).is_file()
            published["input_name"] = Path(value).name
            # train.py records the text's sha256 (input_sha256, copied as is below); only older dirs lack it
            published["input_sha256"] = data.input_sha256 or (file_sha256(Path(value)) if exists else None)
            gone = None if exists else value
        elif key in PATH_KEYS and isinstance(value, str):  # relative as typed: its folders are local too
            published[key] = Path(value).name
        else:
            published[key] = without_local_paths(value)
    staged.write_text(json.dumps(published, indent=2) + "\n")
    return None if gone is None else (gone, published["input_sha256"] is not None)


def without_local_paths(value):
    """`value` with every absolute path in it (at any depth: data_source holds one) cut to its file name, and the
    local paths of PATH_KEYS (--input, --output-dir) even where relative."""
    if isinstance(value, dict):
        return {key: Path(item).name if key in PATH_KEYS and isinstance(item, str) else without_local_paths(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def local_paths(request: PushRequest) -> dict[str, str]:
    """{absolute local path: what it is}: the model dirs, the training texts they record, the home directory."""
    found: dict[str, str] = {}

    def add(path, what):
        path = Path(path).expanduser()
        for form in (path.absolute(), path.resolve()):
            if len(form.parts) > 1:  # never "/" itself (a home directory can be "/")
                found.setdefault(str(form), what)
                found.setdefault(json.dumps(str(form))[1:-1], what)  # as JSON writes it (\u escapes)

    dirs = {"--model-dir": request.model_dir, "--quantized-dir": request.quantized_dir}
    for flag, directory in dirs.items():
        if directory:
            add(directory, f"the {flag} path")
    for flag, directory in dirs.items():
        recorded = TrainingConfig.load(directory) if directory else None
        for value in ((recorded.data and recorded.data.input_path), recorded.input) if recorded else ():
            # input_path is absolute; --input is as typed
            if isinstance(value, str) and Path(value).is_absolute():
                add(value, f"the training text's path (recorded in {flag}'s {TRAINING_ARGS})")
    try:
        add(Path.home(), "your home directory")
    except RuntimeError:  # no home directory to leak
        pass
    return found


TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".py", ".yaml", ".yml")


def check_no_local_paths(out: Path, request: PushRequest) -> None:
    """Refuse the push if any staged text file still holds an absolute local path (say which, where, and why)."""
    paths = local_paths(request)
    if not paths:
        return
    # Whole paths only: /home/al matches in "/home/al/x", "file:///home/al" and "in /home/al.", but not in
    # "/home/alice", "/home/al.bak" or a web URL's "/home/al".
    alternatives = "|".join(map(re.escape, sorted(paths, key=len, reverse=True)))
    pattern = re.compile(rf"(?:(?<![\w.\-/])|(?<=file://))({alternatives})(?![\w\-]|\.[\w\-])")
    sources = {"model": Path(request.model_dir), f"model/{INT8_SUBFOLDER}": request.quantized_dir, "space": SPACE_DIR}
    for path in files_in(out):
        if path.suffix not in TEXT_SUFFIXES:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if match := pattern.search(line):
                relative = path.relative_to(out).as_posix()
                top, name = max(((t, relative[len(t) + 1:]) for t in sources if relative.startswith(t + "/")),
                                key=lambda pair: len(pair[0]))
                rendered = name == "README.md" and top != "space"
                source = "the card rendered from the dir's records" if rendered else f"from {Path(sources[top]) / name}"
                raise PushError(
                    f"the staged {relative} ({source}) holds {paths[match.group(1)]}, {match.group(1)}, on line "
                    f"{number}; nothing uploaded to the Hub may name a local path. Nothing was staged or uploaded: "
                    "remove that path from the file (or the file from the directory) and re-run."
                )


def describe_stage(out: Path, request: PushRequest) -> None:
    model = out / "model"
    print(f"model repo {request.repo_id}: {len(files_in(model))} files, {human_size(tree_size(model))}")
    if (model / INT8_SUBFOLDER).is_dir():
        print(f"  of which the int8 variant in {INT8_SUBFOLDER}/: {len(files_in(model / INT8_SUBFOLDER))} files, "
              f"{human_size(tree_size(model / INT8_SUBFOLDER))}")
    for gguf in model.glob("*.gguf"):
        print(f"  of which the GGUF file for llama.cpp: {gguf.name}, {human_size(file_size(gguf))}")
    if request.space_id:
        space = out / "space"
        print(f"Space {request.space_id}: {len(files_in(space))} files, {human_size(tree_size(space))} "
              f"(serves {request.repo_id}: model_id.txt, README models:)")


# ----------------------------------------------------------------------------------------------------------------
# Upload


def upload(api: HfApi, request: PushRequest, out: Path) -> None:
    """One commit per repo; on failure say what reached the Hub and what did not."""
    done = []
    step = f"creating model repo {request.repo_id}"
    try:
        url = api.create_repo(request.repo_id, private=request.private or None, exist_ok=True)
        if request.revision:
            step = f"creating branch {request.revision} of {request.repo_id}"
            api.create_branch(request.repo_id, branch=request.revision, exist_ok=True)
        step = f"uploading to model repo {request.repo_id}"
        model = out / "model"
        variants = "fp32 + int8" if (model / INT8_SUBFOLDER).is_dir() else "fp32"
        commit = api.upload_folder(
            repo_id=request.repo_id, folder_path=model, revision=request.revision,
            commit_message=f"Upload ToyGPT {variants} ({len(files_in(model))} files, {human_size(tree_size(model))})",
            commit_description="Pushed with ToyGPT's push_to_hub.py: fp32 weights at the root, int8 in `int8/`, "
                               f"and {gguf_filename(request.repo_id)} for llama.cpp.",
        )
        done.append(f"model repo {request.repo_id} pushed at commit {commit.oid}")
        print(f"model repo: {url}\n  commit: {commit.commit_url}")
        if request.space_id:
            step = f"creating Space {request.space_id}"
            url = api.create_repo(request.space_id, repo_type="space", space_sdk="gradio",
                                  private=request.private or None, exist_ok=True)
            step = f"uploading to Space {request.space_id}"
            commit = api.upload_folder(
                repo_id=request.space_id, repo_type="space", folder_path=out / "space",
                commit_message=f"Upload ToyGPT Space serving {request.repo_id}",
            )
            done.append(f"Space {request.space_id} pushed at commit {commit.oid}")
            print(f"Space: {url}\n  commit: {commit.commit_url}")
    except hub_errors() as err:
        pending = ["model repo"] if not done else []
        if request.space_id and len(done) < 2:
            pending.append("Space")
        reached = "; ".join(done) if done else "nothing was pushed"
        raise PushError(
            f"Push failed while {step}: {describe_hub_error(err, f'the Hub ({constants.ENDPOINT})')}\n{reached}; "
            f"not pushed: {', '.join(pending)}. Fix that, then re-run the same command "
            "(re-running is safe: unchanged files are skipped)."
        ) from None


def push(request: PushRequest) -> None:
    """Check everything, stage (into --dry-run's dir, or a temp dir), then upload unless it is a dry run."""
    if request.dry_run is not None and not request.dry_run.strip():  # `--dry-run "$STAGE"`, STAGE unset: no push
        raise UsageError("--dry-run needs the directory to stage into, got an empty string; nothing was uploaded.")
    check_repo_id(request.repo_id, "--repo-id")
    if request.space_id:
        check_repo_id(request.space_id, "--space-id")
    token = None if request.dry_run else require_token()
    model = check_loadable(Path(request.model_dir), "--model-dir", quantized=False)
    if request.quantized_dir:
        check_loadable(Path(request.quantized_dir), "--quantized-dir", quantized=True)
        if stale := quantization.stale_int8(request.model_dir, request.quantized_dir):
            raise UsageError(f"--quantized-dir: {stale}")
    if request.revision and request.space_id:
        print(f"note: the Space loads {request.repo_id} from its default branch, not {request.revision}.")
    if request.private and request.space_id:
        print(f"note: to load the private {request.repo_id}, the Space needs a read token: add it as the Space "
              "secret HF_TOKEN (Space settings -> Variables and secrets).")

    if request.dry_run:
        dry_run(request, Path(request.dry_run), model)
        return
    with tempfile.TemporaryDirectory(prefix="toygpt-push-") as tmp:
        stage(request, Path(tmp), model)
        describe_stage(Path(tmp), request)
        upload(HfApi(token=token), request, Path(tmp))
    revision = f", revision={request.revision!r}" if request.revision else ""
    print(f'done: AutoModelForCausalLM.from_pretrained("{request.repo_id}"{revision}, trust_remote_code=True) loads it'
          + (f' (int8: subfolder="{INT8_SUBFOLDER}")' if request.quantized_dir else ""))


def dry_run(request: PushRequest, out: Path, model) -> None:
    """Stage into `out` under OutputDir's rule: never an input's dir or anything holding one, only a stage this
    script wrote (its marker), swapped in whole; a refusal or a failure is one line and leaves `out` as it was."""
    inputs = [request.model_dir, request.quantized_dir, SPACE_DIR]
    try:
        with OutputDir(out, inputs=inputs, replace=True, flag="--dry-run", owned=is_stage_dir,
                       owner=f"a stage push_to_hub.py --dry-run wrote (it holds {STAGE_MARKER})") as output:
            with output.write() as tmp:
                stage(request, tmp, model)
                (tmp / STAGE_MARKER).write_text("Staged by ToyGPT's push_to_hub.py --dry-run; the next --dry-run here "
                                                "replaces this directory. model/ and space/ are what a push uploads.\n")
    except OSError as err:  # a full disk (DiskFullError says where), a read-only stage: the old stage is as it was
        raise PushError(f"staging into {out} failed ({err}); nothing was uploaded.") from None
    describe_stage(out, request)
    print(f"dry run: staged in {out}; nothing was uploaded.")
