"""What a failed Hub request means, in one sentence naming the fix: push_to_hub.py's uploads and --init-from's
downloads word huggingface_hub's (and the HTTP stacks' underneath) errors here, once."""

from __future__ import annotations


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request can raise: huggingface_hub's HTTP errors (httpx2-based) and its cache misses, its LFS
    upload wrapper (RuntimeError), and transport errors of the HTTP stacks underneath. Imported when asked: the CLIs'
    --help stays instant."""
    import httpx
    import httpx2
    import requests
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, httpx2.HTTPError, httpx.HTTPError,
            requests.RequestException, OSError, RuntimeError)


def describe_hub_error(err: BaseException, where: str, revision: str | None = None) -> str:
    """`err`, raised while asking `where` ("alice/toygpt on the Hub (https://...)"), as a sentence with the fix."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):  # before RepositoryNotFoundError, its base class
        return f"{where} is gated: accept its terms on the Hub and set HF_TOKEN (or `hf auth login`)."
    if isinstance(err, errors.RepositoryNotFoundError):
        return f"{where} does not exist (or is private: set HF_TOKEN)."
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{where} has no revision {revision!r}: pass a branch, tag or commit it has."
    if isinstance(err, errors.HfHubHTTPError):
        return f"{where} refused the request ({type(err).__name__}: {err}); check HF_TOKEN and its access."
    cause = err.__cause__ if isinstance(err, errors.LocalEntryNotFoundError) and err.__cause__ else err
    return f"cannot reach {where} ({type(cause).__name__}: {cause}): check the network and HF_ENDPOINT."
