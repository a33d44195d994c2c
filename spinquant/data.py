"""Calibration and evaluation text through the ``datasets`` library, sampled into token windows.

Sources (``spec`` strings):
- ``wikitext2``: ``load_dataset("wikitext", "wikitext-2-raw-v1")`` from the hub (online users).
- ``hub:NAME[:CONFIG[:SPLIT]]``: any hub dataset.
- a local path: ``.txt``/``.raw`` (one row per line, line breaks kept, as WikiText's hub rows),
  ``.jsonl``/``.json``, ``.parquet``, or a folder of such files.
Rows with a ``messages`` field (chat data) are rendered with the tokenizer's chat template.

Windows: ``nsamples`` distinct random slices of ``seqlen`` tokens (seeded; may overlap as in GPTQ's
sampler, never repeat), optionally starting with BOS. Tokenized windows are cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from spinquant.atomic import atomic_file
from spinquant.errors import SpinQuantError

TEXT_SUFFIXES = {".txt": "text", ".raw": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")

def offline_hint(flag: str) -> str:
    return f"pass {flag} PATH (a local .txt/.raw, .jsonl or .parquet file, or a folder of them, e.g. WikiText-2's wiki.*.raw)"



def _check_text_file(path: Path) -> None:
    """Reject empty and binary files with a clear message (parquet is binary by design)."""
    if path.suffix == ".parquet":
        return
    head = path.open("rb").read(65536)
    if not head.strip():
        raise SpinQuantError(f"calibration file {path} is empty")
    if b"\x00" in head:
        raise SpinQuantError(f"{path} is not a text file (it holds binary data): pass a UTF-8 .txt/.jsonl or a .parquet")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a cut multi-byte character at the end is fine
            raise SpinQuantError(f"{path} is not UTF-8 text (byte {exc.start}): pass a UTF-8 text file") from exc


def local_data_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder name, files) for a file or folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise SpinQuantError(f"folder {path} holds no .txt/.raw/.jsonl/.json/.parquet files")
        builders = {TEXT_SUFFIXES[p.suffix] for p in files}
        if len(builders) > 1:
            raise SpinQuantError(f"folder {path} mixes file types ({', '.join(sorted(builders))}): use one type")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise SpinQuantError(f"unsupported data file {path}: use .txt, .raw, .jsonl, .json or .parquet")
        files = [path]
    else:
        raise SpinQuantError(f"no such data file or folder: {path}")
    for f in files:
        _check_text_file(f)
    return TEXT_SUFFIXES[files[0].suffix], [str(f) for f in files]


def load_rows(spec: str, split: str = "train", flag: str = "--calib-data") -> list[dict[str, Any]]:
    """Rows (dicts) of a data source. Text files give {"text": line-with-newline}, blank lines as "".

    ``flag`` is the CLI option named in the error when the hub cannot be reached.
    """
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec == "wikitext2":
            try:
                ds = datasets.load_dataset(*WIKITEXT_HUB, split=split)
            except Exception as exc:  # offline: ConnectionError, DatasetNotFoundError, ...
                raise SpinQuantError(f"cannot load WikiText-2 from the Hugging Face hub (offline?): {offline_hint(flag)}") from exc
        elif spec.startswith("hub:"):
            parts = spec[4:].split(":")
            name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
            hub_split = parts[2] if len(parts) > 2 else split
            try:
                ds = datasets.load_dataset(name, config, split=hub_split)
            except Exception as exc:
                raise SpinQuantError(f"cannot load hub dataset {spec[4:]} ({type(exc).__name__}): {offline_hint(flag)}") from exc
        else:
            builder, files = local_data_files(Path(spec).expanduser())
            kwargs = {"keep_linebreaks": True} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
            except Exception as exc:
                raise SpinQuantError(f"cannot read {spec} as {builder} data: {str(exc).splitlines()[0]}") from exc
            if builder == "text":
                # WikiText's hub rows: each line with its newline, whitespace-only lines as ""
                ds = ds.map(lambda r: {"text": r["text"] if r["text"].strip() else ""})
    finally:
        datasets.enable_progress_bars()
    rows = list(ds)
    if not rows:
        raise SpinQuantError(f"data source {spec} holds no rows")
    return rows


def rows_to_texts(rows: list[dict[str, Any]], text_field: str, tokenizer: Any = None, template: str = "auto") -> list[str]:
    """Text of each row: ``row[text_field]``, or chat ``messages`` rendered by the tokenizer's chat template."""
    first = rows[0]
    use_chat = template == "chat" or (template == "auto" and text_field not in first and "messages" in first)
    if use_chat:
        if "messages" not in first:
            raise SpinQuantError(f"template 'chat' needs a 'messages' field; the rows have {sorted(first)}")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise SpinQuantError("the data is chat ('messages') but the tokenizer has no chat template: set template: none and text_field")
        return [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    if text_field not in first:
        raise SpinQuantError(f"the data has no field '{text_field}' (fields: {', '.join(sorted(first))}): pass --text-field NAME "
                             f"(or text_field: in a calibration YAML); chat rows need a 'messages' field")
    texts = [r[text_field] for r in rows]
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise SpinQuantError(f"the data's '{text_field}' field holds no text")
    return [t for t in texts if isinstance(t, str)]


def tokenize_stream(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> torch.Tensor:
    """Token ids of ``"\\n\\n".join(texts)`` as one 1-D int64 stream (the GPTQ/QuaRot/SpinQuant protocol)."""
    text = "\n\n".join(texts)
    if not text.strip():
        raise SpinQuantError("the data holds no text")
    saved = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e30)  # silence the 'sequence too long' warning on a whole corpus
    try:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos_id: int | None = None) -> torch.Tensor:
    """(nsamples, seqlen) int64 windows: distinct random slices of ``ids`` (seeded), BOS first if given.

    Start positions are drawn without replacement, so windows never repeat; nsamples may not exceed
    the number of distinct start positions the data allows.
    """
    if nsamples < 1 or seqlen < 2:
        raise SpinQuantError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    body = seqlen - 1 if bos_id is not None else seqlen
    starts_available = ids.numel() - body + 1
    if starts_available < nsamples:
        raise SpinQuantError(
            f"the calibration data has {ids.numel()} tokens: it allows {max(starts_available, 0)} distinct windows of "
            f"{seqlen} tokens, fewer than nsamples={nsamples}; lower --nsamples or --seqlen, or add data"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(starts_available, generator=gen)[:nsamples]
    windows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos_id is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos_id, dtype=torch.int64), windows], dim=1)
    return windows


@dataclass(frozen=True)
class CalibrationSet:
    """What to calibrate on. ``source``: see the module docstring; ``template``: auto | chat | none."""

    source: str = "wikitext2"
    split: str = "train"
    text_field: str = "text"
    template: str = "auto"
    nsamples: int = 128
    seqlen: int = 2048
    bos: bool = True
    seed: int = 0


def calibration_dirs() -> list[Path]:
    """Where named calibration sets (YAML) are found: the repo's calibration/ and the installed copy."""
    import sys

    here = Path(__file__).resolve().parent
    return [here.parent / "calibration", Path(sys.prefix) / "share" / "spinquant" / "calibration"]


def load_calibration_set(name_or_path: str) -> CalibrationSet:
    """A CalibrationSet from a YAML file or a bundled name (``wikitext2``). Relative sources resolve beside the YAML."""
    import yaml

    path = Path(name_or_path).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        found = [d / f"{name_or_path}.yaml" for d in calibration_dirs() if (d / f"{name_or_path}.yaml").is_file()]
        if not found:
            names = sorted({p.stem for d in calibration_dirs() if d.is_dir() for p in d.glob("*.yaml")})
            raise SpinQuantError(f"unknown calibration set '{name_or_path}': pass a YAML file or one of {', '.join(names)}")
        path = found[0]
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpinQuantError(f"invalid YAML in {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise SpinQuantError(f"{path} must hold a mapping of calibration-set fields")
    known = set(CalibrationSet.__dataclass_fields__)
    unknown = set(raw) - known - {"name", "description"}
    if unknown:
        raise SpinQuantError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    fields = {k: v for k, v in raw.items() if k in known}
    src = str(fields.get("source", "wikitext2"))
    if src != "wikitext2" and not src.startswith("hub:") and not Path(src).expanduser().is_absolute():
        fields["source"] = str((path.parent / src).resolve())
    return CalibrationSet(**fields)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def _source_fingerprint(source: str) -> str:
    path = Path(source).expanduser()
    if not path.exists():
        return source
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def cache_dir() -> Path:
    return Path(os.environ.get("SPINQUANT_CACHE_DIR", Path.home() / ".cache" / "spinquant")) / "calibration"


def calibration_windows(calib: CalibrationSet, tokenizer: Any, use_cache: bool = True) -> torch.Tensor:
    """The (nsamples, seqlen) calibration token windows of ``calib``, cached on disk by everything that decides them."""
    key_src = json.dumps({**asdict(calib), "source": _source_fingerprint(calib.source), "tok": _tokenizer_fingerprint(tokenizer)})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    cached = cache_dir() / f"{key}.pt"
    if use_cache and cached.is_file():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:
            cached.unlink(missing_ok=True)  # a broken cache entry is rebuilt
    texts = rows_to_texts(load_rows(calib.source, calib.split), calib.text_field, tokenizer, calib.template)
    ids = tokenize_stream(tokenizer, texts, add_special_tokens=False)
    bos = tokenizer.bos_token_id if calib.bos else None
    windows = sample_windows(ids, calib.nsamples, calib.seqlen, calib.seed, bos)
    if use_cache:
        with atomic_file(cached) as tmp:
            torch.save(windows, tmp)
    return windows


def with_overrides(calib: CalibrationSet, **overrides: Any) -> CalibrationSet:
    """A copy with the non-None overrides applied (CLI flags win over the YAML)."""
    return replace(calib, **{k: v for k, v in overrides.items() if v is not None})


def resolve_calibration(calib: str, calib_data: str | None, nsamples: int | None, seqlen: int | None, seed: int,
                        nsamples_default: int, text_field: str | None = None) -> CalibrationSet:
    """The calibration set of CLI options: the named/YAML set, with --calib-data/--nsamples/--seqlen/--seed on top.
    nsamples: the flag, else the YAML's, else the stage's default."""
    base = load_calibration_set(calib)
    if calib_data is not None and Path(calib_data).expanduser().exists():
        calib_data = str(Path(calib_data).expanduser().resolve())
    fields = base.__dataclass_fields__
    yaml_set = {k for k in fields if getattr(base, k) != fields[k].default}
    return with_overrides(
        base, source=calib_data, seed=seed,
        nsamples=nsamples if nsamples is not None else (None if "nsamples" in yaml_set else nsamples_default),
        seqlen=seqlen, text_field=text_field,
    )
