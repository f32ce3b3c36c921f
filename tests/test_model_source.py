"""MODEL as a Hugging Face hub id (model.source), downloaded by the real huggingface_hub from a stand-in hub on
127.0.0.1 (tests/hub_standin.py): served through the `xlserve` command, `pipeline()` and the Hypercorn app's
`XLSERVE_MODEL`; `--revision`, `--download-dir`, the token from HF_TOKEN / HUGGING_FACE_HUB_TOKEN,
HF_HUB_OFFLINE, and the repositories xlserve refuses.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is imported, and this test
process is offline (tests/conftest.py), so every download runs in a child process started with the
stand-in's environment (`resolve_in_child`, or the `xlserve` command itself); only the offline cases run
here. Two engines start: the command's, and the offline pipeline's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from safetensors.numpy import load_file, save_file

from model.config import INDEX_FILE
from model.loader import checkpoint_tensors
from model.source import ModelSourceError, resolve_model
from serving import GenerationConfig, pipeline
from serving.cli import main
from serving.http.engine_loader import load_engine
from serving.http.options import from_environment
from tests.conftest import REPO
from tests.http_fixtures import ServerProcess, console_script, free_port, openai_client
from tests.hub_standin import Repo, StandInHub, commit_id

PUBLIC = "xlserve-test/tiny-llama"
GATED = "xlserve-test/tiny-llama-gated"
SHARDED = "xlserve-test/tiny-llama-sharded"
PICKLED = "xlserve-test/pickled-only"
REMOTE_CODE = "xlserve-test/remote-code"
TOKEN = "hf_standin_reader"
MAIN, V1 = commit_id("main"), commit_id("v1")
# What serving reads of the tiny checkpoint, and what else its repositories hold that must never be fetched.
SERVING_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "chat_template.jinja"}
NEVER_FETCHED = {"pytorch_model.bin", "modeling_llama.py", "README.md", "original/consolidated.safetensors"}

# One decode and one prefill program: these engines only need to show that what was resolved serves.
ONE_SHAPE = dict(page_size=16, num_pages=9, session_len=64, decode_batch_buckets=(1,), prefill_row_buckets=(1,),
                 prefill_token_buckets=(16,))
ONE_SHAPE_FLAGS = ["--cache-block-seq-len", "16", "--num-pages", "9", "--session-len", "64",
                   "--decode-batch-buckets", "1", "--prefill-row-buckets", "1", "--prefill-token-buckets", "16"]
RESOLVE = """import sys
from model.source import resolve_model
model, revision, download_dir, weights = sys.argv[1:]
print(resolve_model(model, revision or None, download_dir or None, weights=weights == "weights"))"""


def cache_folder(cache: Path, repo_id: str) -> Path:
    """Where huggingface_hub keeps `repo_id` in a cache folder."""
    return cache / ("models--" + repo_id.replace("/", "--"))


@pytest.fixture(scope="module")
def checkpoint(tiny_llama: Path) -> dict[str, bytes]:
    files = {path.name: path.read_bytes() for path in tiny_llama.iterdir()}
    assert set(files) == SERVING_FILES
    return files


@pytest.fixture(scope="module")
def v1_config(checkpoint: dict[str, bytes]) -> bytes:
    """Revision v1 differs from main in its config.json (a shorter context)."""
    return json.dumps({**json.loads(checkpoint["config.json"]), "max_position_embeddings": 128}).encode()


@pytest.fixture(scope="module")
def hub(checkpoint: dict[str, bytes], v1_config: bytes, tmp_path_factory) -> StandInHub:
    decoys = {"pytorch_model.bin": b"a pickle", "modeling_llama.py": b"raise SystemExit", "README.md": b"# tiny",
              "original/consolidated.safetensors": checkpoint["model.safetensors"]}
    full = {**checkpoint, **decoys}
    tokenizer = {name: data for name, data in checkpoint.items() if "token" in name or "template" in name}
    config = json.loads(checkpoint["config.json"])
    remote_config = {**config, "architectures": ["FancyForCausalLM"], "model_type": "fancy",
                     "auto_map": {"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}}
    revisions = {MAIN: full, V1: {**full, "config.json": v1_config}}
    unsharded = {name: data for name, data in full.items() if name != "model.safetensors"}
    repos = {
        PUBLIC: Repo(revisions, {"main": MAIN, "v1": V1}),
        GATED: Repo(revisions, {"main": MAIN, "v1": V1}, token=TOKEN),
        SHARDED: Repo({MAIN: {**unsharded, **sharded(checkpoint["model.safetensors"], tmp_path_factory.mktemp("s"))}},
                      {"main": MAIN}),
        PICKLED: Repo({MAIN: {**tokenizer, "config.json": checkpoint["config.json"],
                              "pytorch_model.bin": b"a pickle"}}, {"main": MAIN}),
        REMOTE_CODE: Repo({MAIN: {**checkpoint, "config.json": json.dumps(remote_config).encode(),
                                  "modeling_fancy.py": b"raise SystemExit"}}, {"main": MAIN}),
    }
    with StandInHub(repos) as standin:
        yield standin
    assert standin.unknown_routes == [], "huggingface_hub called routes the stand-in does not answer"


def sharded(single: bytes, folder: Path) -> dict[str, bytes]:
    """The checkpoint's tensors in two shards with their index, plus a whole copy in another layout (as
    Mistral's repositories hold `consolidated.safetensors` beside the shards)."""
    (folder / "whole.safetensors").write_bytes(single)
    tensors = load_file(folder / "whole.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    files = {"consolidated.safetensors": single}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, folder / shard)
        files[shard] = (folder / shard).read_bytes()
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    files[INDEX_FILE] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


def hub_environment(hub: StandInHub, home: Path, **variables: str | None) -> dict[str, str | None]:
    """A child's environment: online, against the stand-in, with its own HF_HOME and no token unless given."""
    cleared = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE",
               "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH")
    return {**dict.fromkeys(cleared), "HF_ENDPOINT": hub.url, "HF_HOME": str(home), **variables}


def resolve_in_child(
    model: str,
    environment: dict[str, str | None],
    revision: str | None = None,
    download_dir: Path | None = None,
    weights: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`resolve_model` in a fresh interpreter, so huggingface_hub reads `environment` as it is imported."""
    merged = {**os.environ, **environment}
    return subprocess.run(
        [sys.executable, "-c", RESOLVE, model, revision or "", str(download_dir or ""), "weights" * weights],
        env={name: value for name, value in merged.items() if value is not None},
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def resolved(result: subprocess.CompletedProcess[str]) -> Path:
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The ModelSourceError a child ended with."""
    assert result.returncode != 0
    marker = "model.source.ModelSourceError: "
    assert marker in result.stderr, result.stderr
    return result.stderr.split(marker, 1)[1].strip()


@pytest.fixture(scope="module")
def filled_cache(hub: StandInHub, tmp_path_factory) -> tuple[Path, Path]:
    """PUBLIC at main, downloaded into a --download-dir; (that folder, the snapshot served from it)."""
    base = tmp_path_factory.mktemp("filled")
    cache = base / "download-dir"
    return cache, resolved(resolve_in_child(PUBLIC, hub_environment(hub, base / "home"), download_dir=cache))


# ----- downloads --------------------------------------------------------------------------------------------


def test_the_command_serves_a_gated_hub_id_with_the_token_from_the_environment(
    hub: StandInHub, checkpoint: dict[str, bytes], tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [console_script("xlserve"), "serve", "api_server", GATED, "--server-name", "127.0.0.1",
               "--server-port", str(port), *ONE_SHAPE_FLAGS]
    server = ServerProcess(command, hub_environment(hub, tmp_path / "home", HUGGING_FACE_HUB_TOKEN=TOKEN))
    try:
        server.wait_ready(base)
        client = openai_client(f"{base}/v1", "none", max_retries=0)
        [model] = client.models.list().data
        assert model.id == GATED  # the served name defaults to the id
        chat = client.chat.completions.create(model=GATED, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 4 and chat.choices[0].message.content
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0, server.output()
    # Into the default cache ($HF_HOME/hub), only what serving reads, byte for byte.
    snapshot = cache_folder(tmp_path / "home" / "hub", GATED) / "snapshots" / MAIN
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == checkpoint
    assert hub.fetched(GATED) == SERVING_FILES


def test_download_dir_is_where_the_files_land(hub: StandInHub, filled_cache: tuple[Path, Path], tmp_path) -> None:
    cache, folder = filled_cache
    assert folder == cache_folder(cache, PUBLIC) / "snapshots" / MAIN
    assert {path.name for path in folder.iterdir()} == SERVING_FILES
    assert not hub.fetched(PUBLIC) & NEVER_FETCHED


def test_revision_picks_its_files(hub: StandInHub, v1_config: bytes, checkpoint: dict[str, bytes], tmp_path) -> None:
    environment = hub_environment(hub, tmp_path / "home", HF_TOKEN=TOKEN)
    tagged = resolved(resolve_in_child(GATED, environment, revision="v1", download_dir=tmp_path / "cache"))
    assert tagged.name == V1 and (tagged / "config.json").read_bytes() == v1_config
    by_commit = resolved(resolve_in_child(PUBLIC, environment, revision=MAIN, download_dir=tmp_path / "cache"))
    assert by_commit.name == MAIN and (by_commit / "config.json").read_bytes() == checkpoint["config.json"]
    unknown = resolve_in_child(PUBLIC, environment, revision="v9", download_dir=tmp_path / "cache")
    assert refusal(unknown) == f"{PUBLIC} has no revision 'v9'"


def test_a_sharded_checkpoint_fetches_the_shards_its_index_names(hub: StandInHub, tmp_path) -> None:
    folder = resolved(resolve_in_child(SHARDED, hub_environment(hub, tmp_path / "home")))
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert {path.name for path in folder.iterdir()} == SERVING_FILES - {"model.safetensors"} | shards | {INDEX_FILE}
    assert "consolidated.safetensors" not in hub.fetched(SHARDED)
    assert len(checkpoint_tensors(folder)) > 0  # the loader reads what came


def test_random_weights_need_no_weights_downloaded(hub: StandInHub, tmp_path) -> None:
    """`--load-format dummy` serves random weights at the checkpoint's shapes: only its config and tokenizer come."""
    folder = resolved(resolve_in_child(PUBLIC, hub_environment(hub, tmp_path / "home"), weights=False))
    assert {path.name for path in folder.iterdir()} == SERVING_FILES - {"model.safetensors"}


def test_a_gated_repository_without_a_token_is_refused(hub: StandInHub, tmp_path) -> None:
    message = refusal(resolve_in_child(GATED, hub_environment(hub, tmp_path / "home")))
    assert message.startswith(f"{GATED} is gated: accept its conditions at {hub.url}/{GATED}")
    assert "neither HF_TOKEN nor HUGGING_FACE_HUB_TOKEN is set" in message


def test_a_wrong_token_is_one_clear_line_from_the_command(hub: StandInHub, tmp_path) -> None:
    result = subprocess.run(
        [console_script("xlserve"), "serve", "api_server", GATED],
        env={name: value for name, value in {**os.environ, **hub_environment(
            hub, tmp_path / "home", HF_TOKEN="hf_not_a_token")}.items() if value is not None},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"xlserve: error: cannot load the model: {hub.url} refused the token for {GATED} as invalid "
        "(the token sent was HF_TOKEN's)"
    )
    assert "Traceback" not in result.stderr and "hf_not_a_token" not in result.stderr


def test_pickled_weights_are_refused_and_never_fetched(hub: StandInHub, tmp_path) -> None:
    message = refusal(resolve_in_child(PICKLED, hub_environment(hub, tmp_path / "home")))
    assert message.startswith(f"{PICKLED} has no safetensors weights")
    assert "never loads pickled PyTorch weights" in message
    assert "pytorch_model.bin" not in hub.fetched(PICKLED)


def test_remote_code_is_refused_before_the_weights_download(hub: StandInHub, tmp_path) -> None:
    message = refusal(resolve_in_child(REMOTE_CODE, hub_environment(hub, tmp_path / "home")))
    assert message.startswith(
        f"{REMOTE_CODE} cannot be served: unsupported architecture FancyForCausalLM, whose modelling code ships "
        "with the checkpoint (auto_map)"
    )
    assert hub.fetched(REMOTE_CODE) == {"config.json", "generation_config.json"}


# ----- offline, in this process (conftest.py set HF_HUB_OFFLINE=1 before huggingface_hub loaded) ------------


def test_pipeline_serves_a_hub_id_offline_from_a_filled_cache(filled_cache: tuple[Path, Path]) -> None:
    assert constants.is_offline_mode()
    cache, folder = filled_cache
    with pipeline(PUBLIC, download_dir=str(cache), **ONE_SHAPE) as pipe:
        assert pipe.engine.model_path == str(folder)
        out = pipe("Hello", gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert out.generate_token_len == 4 and out.finish_reason == "length"


def test_the_hypercorn_app_resolves_xlserve_model_offline(filled_cache: tuple[Path, Path]) -> None:
    cache, folder = filled_cache
    launch = from_environment({"XLSERVE_MODEL": PUBLIC, "XLSERVE_DOWNLOAD_DIR": str(cache),
                               "XLSERVE_ENGINE_PROCESS": "false", "XLSERVE_NUM_PAGES": "9",
                               "XLSERVE_SESSION_LEN": "128", "XLSERVE_CACHE_BLOCK_SEQ_LEN": "16"})
    engine = load_engine(launch)  # what `hypercorn serving.app:app` runs at import; its weights load
    assert engine.model_path == str(folder) and launch.settings.model_name == PUBLIC


def test_offline_with_an_empty_cache_names_the_id_and_the_cache(tmp_path, capsys) -> None:
    expected = (f"{PUBLIC} is not (wholly) in the Hugging Face cache {tmp_path}, and HF_HUB_OFFLINE=1 "
                "forbids downloading it")
    with pytest.raises(ModelSourceError) as refused:
        pipeline(PUBLIC, download_dir=str(tmp_path))
    assert str(refused.value) == expected
    with pytest.raises(ModelSourceError):
        load_engine(from_environment({"XLSERVE_MODEL": PUBLIC, "XLSERVE_DOWNLOAD_DIR": str(tmp_path)}))
    assert main(["serve", "api_server", PUBLIC, "--download-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"xlserve: error: cannot load the model: {expected}"


def test_what_model_may_be(tiny_llama: Path) -> None:
    assert resolve_model(str(tiny_llama), download_dir="/unused") == str(tiny_llama)  # a folder is served as is
    with pytest.raises(ModelSourceError, match="a revision applies to a Hugging Face hub id only"):
        resolve_model(str(tiny_llama), revision="main")
    for neither in ("/no/such/checkpoint", "no-such-folder", "a/b/c", "org/bad--name"):
        with pytest.raises(ModelSourceError, match="is neither a local folder, a GGUF file nor a Hugging Face hub id"):
            resolve_model(neither)
