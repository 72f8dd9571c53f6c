"""Fixtures shared by the test modules."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import settings

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small layers: on a busy 2-core machine two OpenMP threads wait on each
    other (small depthwise convs ran 20x slower). Modules opt in with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=NAMESPACES)
def pl_ns(request: pytest.FixtureRequest) -> ModuleType:
    """The Lightning package a test runs under: ``pytorch_lightning`` or ``lightning.pytorch``."""
    return importlib.import_module(request.param)


@pytest.fixture
def project(pl_ns: ModuleType) -> Any:
    """A user's ``Model`` and ``DataModule`` (tests/nets.py ``user_project``), subclassing ``pl_ns``'s own bases."""
    from nets import user_project

    return user_project(pl_ns.__name__)


# CI runs the property tests on a fixed set of examples (a red CI must mean a regression, not a new draw); a
# developer's run draws new ones each time, which is how a new failure is found.
settings.register_profile("ci", derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")
