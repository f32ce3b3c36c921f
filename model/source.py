"""Where a served model comes from: MODEL, as given to `xlserve serve api_server`, in XLSERVE_MODEL or to
`pipeline()`, turned into the local checkpoint folder or file that the loader reads.

MODEL is either
- a local folder (a Hugging Face checkpoint: config.json, *.safetensors, tokenizer files, or a folder holding
  one GGUF file), used as it is,
- a local GGUF file (llama.cpp's and Ollama's format, read by model/gguf.py), used as it is, or
- a Hugging Face hub id `org/name`, downloaded with huggingface_hub into its cache, or into `download_dir`
  (LMDeploy's `--download-dir`, which is a cache folder of the same layout), at `revision` (a branch, tag or
  commit; default: the main branch). A cached snapshot is not fetched again.

A download fetches only what serving reads, in two steps. First config.json, generation_config.json and the
weights' index, checked as the loader checks them, so that a repository xlserve cannot serve (an architecture
it does not implement, one whose modelling code ships with the checkpoint) is refused before gigabytes of
weights arrive. Then the tokenizer and chat template files and the safetensors weights: `model.safetensors`,
or exactly the shards the index names (repositories often also hold the same weights in another layout, such
as Mistral's `consolidated.safetensors`). Python files and pickled weights (`*.bin`, `*.pt`) are never
fetched, so code shipped with a checkpoint is never run and a pickle is never loaded.

The environment is huggingface_hub's own, read by it: HF_TOKEN (or HUGGING_FACE_HUB_TOKEN, or the token
saved by `hf auth login`) for gated and private repositories, HF_ENDPOINT for a mirror, HF_HUB_OFFLINE=1 to
use only the cache, HF_HOME or HF_HUB_CACHE for where the cache is. Its progress bars show the download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from model.config import INDEX_FILE, SINGLE_FILE, ModelConfig

CONFIG_FILES = ("config.json", "generation_config.json", INDEX_FILE)
# What transformers reads to build a fast tokenizer and its chat templates (SentencePiece, BPE vocab +
# merges, or tokenizer.json), and nothing it would import code from.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
)


class ModelSourceError(ValueError):
    """MODEL names nothing xlserve can serve, or fetching it failed; the message says which, and what to do."""


def resolve_model(
    model: str, revision: str | None = None, download_dir: str | None = None, *, weights: bool = True
) -> str:
    """The local checkpoint folder or GGUF file MODEL names, downloading a hub id's files first (see the
    module's docstring).

    `download_dir` only says where downloads go, so it changes nothing for a local folder; a `revision`
    cannot be honoured there and is an error. `weights=False` fetches no weights (`--load-format dummy`
    serves random ones at the checkpoint's shapes).
    """
    local = os.path.isdir(model) or os.path.isfile(model)
    if local and revision is not None:
        raise ModelSourceError(f"{model!r} is local: a revision applies to a Hugging Face hub id only")
    if os.path.isdir(model):
        return model
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ModelSourceError(f"{model!r} is a file but not a GGUF file (.gguf); a checkpoint is a folder")
        return model
    if _is_hub_id(model):
        return _from_hub(model, revision, download_dir, weights)
    raise ModelSourceError(
        f"model {model!r} is neither a local folder, a GGUF file nor a Hugging Face hub id (org/name, e.g. "
        "internlm/internlm2_5-7b-chat)"
    )


def _is_hub_id(model: str) -> bool:
    if model.count("/") != 1:  # a bare name is more likely a mistyped folder than a legacy hub alias
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _from_hub(repo_id: str, revision: str | None, cache_dir: str | None, weights: bool) -> str:
    folder = _download(repo_id, revision, cache_dir, CONFIG_FILES)
    try:
        ModelConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{repo_id} cannot be served: {error}") from error
    # The folder is the snapshot of one commit (<cache>/models--org--name/snapshots/<commit>): the rest is
    # fetched from that commit, so a branch that moves meanwhile cannot mix two versions.
    commit = Path(folder).name
    folder = _download(repo_id, commit, cache_dir, TOKENIZER_FILES + (_weight_files(folder) if weights else ()))
    if weights and not any((Path(folder) / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        raise ModelSourceError(
            f"{repo_id} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); xlserve never loads "
            "pickled PyTorch weights (*.bin, *.pt): pick a repository or revision that has safetensors"
        )
    return folder


def _weight_files(folder: str) -> tuple[str, ...]:
    """`model.safetensors`, or the shards the index names."""
    index = Path(folder) / INDEX_FILE
    if not index.is_file():
        return (SINGLE_FILE,)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return tuple(sorted(set(weight_map.values())))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelSourceError(f"{INDEX_FILE} of {Path(folder)} has no readable weight_map: {error!r}") from error


def _download(repo_id: str, revision: str | None, cache_dir: str | None, patterns: Sequence[str]) -> str:
    """snapshot_download of the files matching `patterns`, its errors told in terms of what to do."""
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(patterns))
    except GatedRepoError as error:
        raise ModelSourceError(
            f"{repo_id} is gated: accept its conditions at {constants.ENDPOINT}/{repo_id}, then set HF_TOKEN to "
            f"a token of that account ({_token_state()})"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelSourceError(
            f"{repo_id}: no such model at {constants.ENDPOINT}, or it is private and the token cannot read it "
            f"({_token_state()})"
        ) from error
    except RevisionNotFoundError as error:
        raise ModelSourceError(f"{repo_id} has no revision {revision!r}") from error
    except LocalEntryNotFoundError as error:
        cache = cache_dir or constants.HF_HUB_CACHE
        wanted = repo_id if revision is None else f"{repo_id} at revision {revision!r}"
        if constants.is_offline_mode():
            raise ModelSourceError(
                f"{wanted} is not (wholly) in the Hugging Face cache {cache}, and HF_HUB_OFFLINE=1 forbids "
                "downloading it"
            ) from error
        raise ModelSourceError(
            f"cannot reach {constants.ENDPOINT} to download {wanted}, and it is not in the cache {cache}: "
            f"{str(error.__cause__ or error).splitlines()[0]}"
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code
        if status == 401:  # the hub's answer to a token it does not know
            raise ModelSourceError(
                f"{constants.ENDPOINT} refused the token for {repo_id} as invalid ({_token_state()})"
            ) from error
        raise ModelSourceError(f"{constants.ENDPOINT} answered {status} for {repo_id}") from error


def _token_state() -> str:
    """Which token was sent, by where it came from (never its value)."""
    if os.environ.get("HF_TOKEN"):
        return "the token sent was HF_TOKEN's"
    if os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the token sent was HUGGING_FACE_HUB_TOKEN's"
    if get_token():
        return "the token sent was the one saved by `hf auth login`"
    return "no token was sent: neither HF_TOKEN nor HUGGING_FACE_HUB_TOKEN is set"
