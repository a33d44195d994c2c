"""Shared fixtures. Everything runs offline; ../shared is reached only through SPINQUANT_SHARED."""

from __future__ import annotations

import os

# No network in tests: the hub is never reached, and its code paths fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import make_tiny_model, make_tiny_tokenizer  # noqa: E402


def _shared_path(rel: str) -> Path:
    """A file under SPINQUANT_SHARED: fails when the variable is set and the file is missing, skips when unset."""
    root = os.environ.get("SPINQUANT_SHARED")
    if not root:
        pytest.skip(f"SPINQUANT_SHARED is not set: skipping a test that needs {rel} from ../shared")
    path = Path(root) / rel
    if not path.exists():
        pytest.fail(f"SPINQUANT_SHARED={root} but {path} is missing")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPINQUANT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def ref_model_dir() -> Path:
    return _shared_path("models/ref-llama-25m")


@pytest.fixture(scope="session")
def wikitext_test_file() -> Path:
    return _shared_path("data/wikitext-2-raw/wiki.test.raw")


@pytest.fixture(scope="session")
def wikitext_valid_file() -> Path:
    return _shared_path("data/wikitext-2-raw/wiki.valid.raw")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama (GQA, tied embeddings, non-trivial norms) with a tokenizer, saved as an HF directory."""
    torch.manual_seed(0)
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    from tests.helpers import CORPUS

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path
