"""Shared fixtures: tiny tokenizers of every family, and the real vocabularies from ../shared/data.

Session-scoped and shared between tests: do not mutate the tokenizers they return (add tokens, change
special tokens); load a private copy with `load_tokenizer(toy_tokenizer_dir(family))` instead.
The real vocabularies live beside the repository (`<repo>/../shared/data`); tests using them skip, with the
reason, when that folder is absent.
"""

import json
import os
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds a CPU op into TORCH_EXTENSIONS_DIR (default ~/.cache, shared by every environment);
# builds from two environments overwrite each other, and a process killed mid-build leaves a lock there
# that stalls every later one. `make test` sets one folder per environment; a bare pytest run gets it too.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TOY_FAMILIES = ("llama", "mistral", "qwen", "phi", "stablelm")

# tokenizer_config.json of the official folders whose vocabulary files ../shared/data holds.
_REAL_FOLDERS = {
    # Qwen/Qwen-1_8B
    "qwen": ("qwen.tiktoken", "qwen.tiktoken", {
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }),
    # lmsys/vicuna-7b-v1.5 (the Llama-2 SentencePiece model)
    "llama2": ("llama2_tokenizer.model", "tokenizer.model", {
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": 4096, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        **{key: {"__type": "AddedToken", "content": token, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False}
           for key, token in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))},
    }),
    # StableLM-2's Arcade100kTokenizer on the cl100k_base ranks (a stand-in for arcade100k.tiktoken)
    "arcade100k": ("cl100k_base.tiktoken", "arcade100k.tiktoken", {
        "model_max_length": 4096, "tokenizer_class": "Arcade100kTokenizer", "errors": "replace",
        "auto_map": {"AutoTokenizer": ["tokenization_arcade100k.Arcade100kTokenizer", None]},
    }),
}


def write_real_tokenizer_folder(name: str, folder: Path, data_dir: Path = SHARED_DATA) -> Path:
    """An official-layout tokenizer folder for "qwen" | "llama2" | "arcade100k" in `folder`: the vocabulary
    file of `data_dir` (symlinked) and the official tokenizer_config.json. Also used by benchmarks/."""
    source_name, target_name, config = _REAL_FOLDERS[name]
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(data_dir, source_name).resolve(), folder / target_name)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def shared_data_file(name: str) -> Path:
    """Path of a file or folder in ../shared/data; skips the calling test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real tokenizer data {path} is not available (../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder (skips when absent)."""
    return shared_data_file(".")


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory):
    """Factory: family -> folder of that family's tiny tokenizer (built once per session)."""
    from moellava.tokenization.toy import build_toy_tokenizer

    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = Path(build_toy_tokenizer(family, tmp_path_factory.mktemp(f"toy_tokenizer_{family}")))
        return built[family]

    return get


@pytest.fixture(scope="session")
def toy_tokenizers(toy_tokenizer_dir):
    """family -> tiny tokenizer loaded with `load_tokenizer` (family rules applied). Do not mutate."""
    from moellava.tokenization import load_tokenizer

    return {family: load_tokenizer(toy_tokenizer_dir(family)) for family in TOY_FAMILIES}


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory):
    """Factory: "qwen" | "llama2" | "phi2" | "arcade100k" -> an official-layout tokenizer folder holding the
    real vocabulary from ../shared/data (skips when absent). "arcade100k" uses the cl100k_base ranks."""
    made = {}

    def get(name: str) -> Path:
        if name == "phi2":
            return shared_data_file("phi-2")
        if name not in made:
            shared_data_file(_REAL_FOLDERS[name][0])  # skips when absent
            made[name] = write_real_tokenizer_folder(name, tmp_path_factory.mktemp(f"real_tokenizer_{name}"))
        return made[name]

    return get


@pytest.fixture(scope="session")
def real_qwen_tokenizer(real_tokenizer_dir):
    """The real Qwen tokenizer with the qwen family rules (unk = pad = <|extra_0|>, eos = <|endoftext|>)."""
    from moellava.tokenization import load_tokenizer

    return load_tokenizer(real_tokenizer_dir("qwen"))


@pytest.fixture(scope="session")
def real_llama2_tokenizer(real_tokenizer_dir):
    """The real Llama-2 (Vicuna-v1.5) tokenizer with the llama family rules (pad = unk = <unk>)."""
    from moellava.tokenization import load_tokenizer

    return load_tokenizer(real_tokenizer_dir("llama2"))


@pytest.fixture(scope="session")
def real_phi2_tokenizer(real_tokenizer_dir):
    """The real phi-2 tokenizer with the phi family rules (unk = pad = <|extra_0|>)."""
    from moellava.tokenization import load_tokenizer

    return load_tokenizer(real_tokenizer_dir("phi2"))


def free_port() -> int:
    """A free TCP port on localhost (for process-group rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ds_group():
    """A one-process gloo group initialised through DeepSpeed (what the deepspeed MoE backend needs),
    torn down after the module; reused when one is already up."""
    from deepspeed import comm as ds_comm

    if ds_comm.is_initialized():
        yield
        return
    import deepspeed

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        yield
        ds_comm.destroy_process_group()
