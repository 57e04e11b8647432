"""The house keeps its shape: every module imports, the core does no I/O, imports point one
way (no cycles), no module grows past ~500 lines, and the curated API resolves."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lensllm_jax

PKG = Path(lensllm_jax.__file__).parent
MODULES = sorted(
    m.name for m in pkgutil.walk_packages([str(PKG)], "lensllm_jax.") if "__main__" not in m.name
)
# Standard-library and third-party modules the numerical core may not import: files,
# processes, the network, the environment, data frames, torch.
CORE_FORBIDDEN = {
    "os",
    "io",
    "sys",
    "pathlib",
    "shutil",
    "tempfile",
    "subprocess",
    "json",
    "csv",
    "pickle",
    "urllib",
    "http",
    "socket",
    "pandas",
    "torch",
    "transformers",
    "rich",
}
MAX_LINES = 560


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin)


def _imports(module: str) -> set[str]:
    """Modules `module` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(_source(module).read_text())
    is_pkg = _source(module).name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _top_level_imports(module: str) -> set[str]:
    """Our modules imported at module level (what runs at import time: cycles live here)."""
    tree = ast.parse(_source(module).read_text())
    out = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out.update(n for n in names if n in MODULES)
    return out


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_core_imports_no_io():
    core = [m for m in MODULES if m.startswith("lensllm_jax.core")]
    assert "lensllm_jax.core.fit" in core and "lensllm_jax.core.ntk" in core
    for module in core:
        imported = _imports(module)
        roots = {name.split(".")[0] for name in imported}
        assert not roots & CORE_FORBIDDEN, (module, roots & CORE_FORBIDDEN)
        ours = {n for n in imported if n.startswith("lensllm_jax")}
        assert all(n.startswith(("lensllm_jax.core", "lensllm_jax.errors")) for n in ours), (
            module,
            ours,
        )


def test_core_runs_with_files_and_environment_closed():
    """After jax itself is loaded, the core imports and computes with `open` raising: it
    reads no file. (That it reads no environment variable is the static check above: it
    does not import os; jax itself reads XLA_FLAGS when it compiles.)"""
    code = textwrap.dedent(
        """
        import builtins
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_platforms", "cpu")
        jnp.zeros(1).block_until_ready()  # let jax finish its own start-up reads

        def closed(*a, **k):
            raise AssertionError(f"the core touched the outside world: {a[:1]}")

        builtins.open = closed
        from lensllm_jax.core import fit, hessian, laws, ntk, ntk_loss
        d = 200.0 * 2.0 ** np.arange(8)
        l = 30.0 / (10.0 + d**0.4) + 0.8
        res = fit.fit_law("rectified", d, l, num_starts=4)
        assert res.ok.all()
        f = lambda p, x: jnp.tanh(x @ p["w"])
        p = {"w": jnp.ones((3, 2))}
        theta = ntk.empirical_ntk(f, p, jnp.ones((4, 3)), memory_budget_bytes=10**6)
        assert theta.shape == (4, 4)
        loss = lambda q: jnp.sum(f(q, jnp.ones((4, 3))) ** 2)
        tr = hessian.hutchinson_trace(loss, p, jax.random.PRNGKey(0), 4)
        assert np.isfinite(tr.mean)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_no_import_cycles_at_module_level():
    graph = {m: _top_level_imports(m) - {m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_module_over_the_size_limit():
    sizes = {m: len(_source(m).read_text().splitlines()) for m in MODULES}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda x: -x[1])[:3]


def test_curated_api_resolves_and_is_what_all_says():
    from lensllm_jax import _EXPORTS, _SUBPACKAGES

    assert sorted(lensllm_jax.__all__) == sorted([*_EXPORTS, *_SUBPACKAGES, "__version__"])
    for name in lensllm_jax.__all__:
        assert getattr(lensllm_jax, name) is not None
    # the names that share a room's name are the functions, not the rooms
    assert callable(lensllm_jax.run) and callable(lensllm_jax.rank)
    with pytest.raises(AttributeError):
        lensllm_jax.no_such_name


def test_importing_the_package_does_not_import_jax():
    code = "import sys, lensllm_jax, lensllm_jax.cli; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
