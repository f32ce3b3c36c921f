"""Where JAX's persistent compilation cache goes, per setting and platform (no compilation here)."""

from __future__ import annotations

import jax
import pytest

from serving.engine.compile_cache import enable_compilation_cache, resolve_cache_dir
from serving.engine.config import EngineConfig
from serving.request import InvalidRequestError


def test_auto_is_a_per_user_directory_on_accelerators_and_off_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_cache_dir("auto", "gpu") == str(tmp_path / "xlserve" / "jax")
    assert resolve_cache_dir("auto", "cpu") is None
    assert resolve_cache_dir("off", "gpu") is None
    assert resolve_cache_dir(str(tmp_path / "c"), "cpu") == str(tmp_path / "c")


def test_auto_on_cpu_leaves_jax_alone():
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache("auto", "cpu") == before
    assert jax.config.jax_compilation_cache_dir == before


def test_an_explicit_directory_is_created_and_given_to_jax(tmp_path):
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        path = tmp_path / "cache"
        assert enable_compilation_cache(str(path), "cpu") == str(path)
        assert path.is_dir() and jax.config.jax_compilation_cache_dir == str(path)
        assert enable_compilation_cache("auto", "gpu") == str(path)  # a directory already set wins over auto
        assert enable_compilation_cache("off", "gpu") is None  # and none for an engine that asks for none
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_config_refuses_an_empty_directory():
    assert EngineConfig().compilation_cache_dir == "auto"
    with pytest.raises(InvalidRequestError):
        EngineConfig(compilation_cache_dir="")
