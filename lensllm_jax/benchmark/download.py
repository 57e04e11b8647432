"""Where the fine-tuning scaling benchmark's curve tables come from.

Search order (first hit wins):

1. explicit ``--data`` entries: CSV files, folders (every ``*.csv`` in them), or a dataset
   name: ``flan`` and ``gigaword`` are shipped inside the package (``benchmark/fts``, with
   their Apache-2.0 licence); ``wmt19`` is downloaded once from Lin et al.'s public
   repository at a pinned commit into ``$LENSLLM_CACHE/fts`` (default
   ``~/.cache/lensllm_jax/fts``), written atomically and checked against a SHA-256 digest;
2. the folder in the environment variable ``LENSLLM_DATA``;
3. the shipped FLAN and Gigaword tables (no network needed).

A cached file whose digest is wrong (a torn or edited copy) is fetched again; a downloaded
file whose digest is wrong is an error, never used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from lensllm_jax.data._files import CACHE_ENV, cache_root, write_atomic
from lensllm_jax.errors import DataUnavailableError, DownloadError, LensLLMInputError

__all__ = [
    "BENCHMARK_COMMIT",
    "BENCHMARK_FILES",
    "BENCHMARK_SHA256",
    "CACHE_ENV",
    "DATA_ENV",
    "EMBEDDED_FILES",
    "benchmark_url",
    "cache_root",
    "embedded_dir",
    "ensure_benchmark",
    "fetch_url",
    "resolve_data",
    "sha256_file",
]

DATA_ENV = "LENSLLM_DATA"

BENCHMARK_REPO = "linhaowei1/Fine-tuning-Scaling-Law"
# The commit the digests below were taken from; pinning it makes the download reproducible.
BENCHMARK_COMMIT = "b7012351b1635c0b276f4a256a3ad02eb3e24a1d"
BENCHMARK_FILES = ("flan.csv", "gigaword.csv", "wmt19.csv")
EMBEDDED_FILES = ("flan.csv", "gigaword.csv")  # shipped in lensllm_jax/benchmark/fts
BENCHMARK_SHA256 = {
    # Digests of the files at BENCHMARK_COMMIT (flan and gigaword: the project's shared
    # copies, which are unchanged; wmt19: the repository file at that commit).
    "flan.csv": "ead24af8eaa97ac0507bbd76c4880eb09c6361e252f4971666ba55017215d1e9",
    "gigaword.csv": "7d0b08ef9df06eefb4355f859fb44e7860c1e55effd781d318d60a1f8661f2b3",
    "wmt19.csv": "523b044495f87c1f954c359fb489cf4e38f739c7fca8161d70665853fb2d293a",
}

Fetcher = Callable[[str], bytes]


def benchmark_url(filename: str, commit: str = BENCHMARK_COMMIT) -> str:
    """Raw URL of ``benchmark/<filename>`` in Lin et al.'s repository at `commit`."""
    return f"https://raw.githubusercontent.com/{BENCHMARK_REPO}/{commit}/benchmark/{filename}"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch_url(url: str, timeout: float = 30.0) -> bytes:
    """GET `url` and return its body (the default fetcher; tests replace it)."""
    import http.client  # imported here: only a download pays for the http/ssl stack
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except http.client.HTTPException as err:  # not an OSError; normalise for the caller
        raise OSError(f"{type(err).__name__}: {err}") from err


def ensure_benchmark(
    cache_dir: str | os.PathLike[str] | None = None,
    files: Sequence[str] | None = None,
    *,
    fetcher: Fetcher | None = None,
) -> list[Path]:
    """Paths of the benchmark CSVs in the cache, downloading those missing or corrupt.

    `files` defaults to `BENCHMARK_FILES` (flan, gigaword, wmt19); `fetcher(url) -> bytes`
    defaults to `fetch_url`. Cost: one SHA-256 per cached file (a few kB each).

    Raises:
      DataUnavailableError: a download failed or its SHA-256 digest did not match.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "fts"
    fetch = fetch_url if fetcher is None else fetcher
    files = BENCHMARK_FILES if files is None else files
    paths: list[Path] = []
    for name in files:
        path = folder / name
        expected = BENCHMARK_SHA256.get(name)
        if path.is_file() and (expected is None or sha256_file(path) == expected):
            paths.append(path)
            continue
        url = benchmark_url(name)
        try:
            data = fetch(url)
        except OSError as err:  # URLError, HTTPError, timeouts are all OSErrors
            reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"cannot download {url} ({reason})",
                file=name,
                hint=f"pass --data PATH or set {DATA_ENV} to a folder holding the CSVs",
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if expected is not None and digest != expected:
            raise DataUnavailableError(
                f"downloaded file's SHA-256 is {digest[:16]}..., expected {expected[:16]}... "
                f"(from {url})",
                file=name,
                hint=f"the upstream file changed; pass --data PATH or set {DATA_ENV}",
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError as err:
            raise DataUnavailableError(
                f"cannot write the cache ({err.strerror})",
                file=path,
                hint=f"set {CACHE_ENV} to a writable folder",
            ) from None
        paths.append(path)
    return paths


def _csvs_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    if not found:
        raise LensLLMInputError(
            "folder holds no .csv files", file=folder, hint="point it at the benchmark CSVs"
        )
    return found


def embedded_dir() -> Path:
    """The folder of the FLAN and Gigaword tables shipped inside the package."""
    return Path(str(resources.files("lensllm_jax.benchmark") / "fts"))


def _dataset(name: str, env: Mapping[str, str], fetcher: Fetcher | None) -> Path:
    """A benchmark dataset by name: shipped (flan, gigaword) or cached / downloaded."""
    filename = f"{name}.csv"
    if filename in EMBEDDED_FILES:
        return embedded_dir() / filename
    return ensure_benchmark(cache_root(env) / "fts", [filename], fetcher=fetcher)[0]


def resolve_data(
    paths: Sequence[str | os.PathLike[str]] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    fetcher: Fetcher | None = None,
) -> list[Path]:
    """The CSV files to read.

    Each of `paths` is a CSV file, a folder (its ``*.csv`` files, sorted) or the name of a
    benchmark dataset (``flan``, ``gigaword``: shipped; ``wmt19``: downloaded once into the
    cache and checked). Without `paths`: the folder in ``$LENSLLM_DATA``, else the shipped
    FLAN and Gigaword tables, so the default needs no network. A missing path is an error,
    not a reason to fall back, so a typo never silently runs on other data.
    """
    env = os.environ if env is None else env
    names = {f.removesuffix(".csv") for f in BENCHMARK_FILES}
    if paths:
        out: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                out.extend(_csvs_in(p))
            elif p.exists():
                out.append(p)
            elif str(p) in names:
                out.append(_dataset(str(p), env, fetcher))
            else:
                raise LensLLMInputError(
                    "no such file or folder, nor a benchmark dataset",
                    file=p,
                    hint="check the path given to --data, or name one of "
                    + ", ".join(sorted(names)),
                )
        return out
    if env.get(DATA_ENV):
        folder = Path(env[DATA_ENV]).expanduser()
        if not folder.is_dir():
            raise LensLLMInputError(
                f"${DATA_ENV} is not a folder",
                file=folder,
                hint=f"set {DATA_ENV} to the folder holding the benchmark CSVs, or unset it",
            )
        return _csvs_in(folder)
    return [embedded_dir() / f for f in EMBEDDED_FILES]
