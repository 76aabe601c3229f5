"""Preloading tcmalloc + Intel OpenMP for the serving commands (no engine)."""

from __future__ import annotations

import sys

import pytest

from vllm_medusa import preload


class Exec(Exception):
    pass


def _capture_exec(monkeypatch):
    calls = []

    def execve(path, args, env):
        calls.append((path, args, env))
        raise Exec

    monkeypatch.setattr(preload.os, "execve", execve)
    return calls


def test_serving_commands_reexecute_once_with_the_libraries_first(monkeypatch, tmp_path):
    libs = [str(tmp_path / "libtcmalloc_minimal.so.4"), str(tmp_path / "libiomp5.so")]
    monkeypatch.setattr(preload, "preload_libraries", lambda: libs)
    monkeypatch.setenv("LD_PRELOAD", "/other/lib.so")
    monkeypatch.delenv(preload.PRELOAD_ENV, raising=False)
    calls = _capture_exec(monkeypatch)
    with pytest.raises(Exec):
        preload.reexec_with_preload(["generate", "--quiet"])
    ((path, args, env),) = calls
    assert path == sys.executable
    assert args == [sys.executable, "-m", "vllm_medusa.cli", "generate", "--quiet"]
    assert env["LD_PRELOAD"] == ":".join([*libs, "/other/lib.so"])
    # The re-executed process has them: no second exec.
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])
    preload.reexec_with_preload(["generate"])
    assert len(calls) == 1


def test_no_reexec_when_turned_off_or_not_installed(monkeypatch, tmp_path):
    calls = _capture_exec(monkeypatch)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(preload, "preload_libraries", lambda: [str(tmp_path / "libiomp5.so")])
    preload.reexec_with_preload(["serve"])  # tcmalloc missing: runs as it is
    monkeypatch.setattr(preload, "preload_libraries", lambda: ["/a.so", "/b.so"])
    monkeypatch.setenv(preload.PRELOAD_ENV, "0")
    preload.reexec_with_preload(["serve"])
    assert calls == []
    monkeypatch.setenv(preload.PRELOAD_ENV, "yes")
    with pytest.raises(ValueError, match="VLLM_MEDUSA_PRELOAD must be '0' or '1'"):
        preload.reexec_with_preload(["serve"])


def test_cli_preloads_generate_and_serve_only(monkeypatch):
    """The command line re-executes ``generate`` and ``serve`` before running them; other
    commands and programmatic calls (``main(argv)``) run as they are."""
    import vllm_medusa.generate
    import vllm_medusa.training.calibrate
    from vllm_medusa import cli

    seen = []

    def reexec(argv):
        seen.append(argv)
        raise Exec

    monkeypatch.setattr(preload, "reexec_with_preload", reexec)
    ran = []
    monkeypatch.setattr(vllm_medusa.generate, "run", lambda args: ran.append("generate") or 0)
    monkeypatch.setattr(
        vllm_medusa.training.calibrate, "run", lambda args: ran.append("calibrate") or 0
    )
    monkeypatch.setattr(sys, "argv", ["vllm-medusa", "generate", "--quiet"])
    with pytest.raises(Exec):
        cli.main()
    assert seen == [["generate", "--quiet"]] and ran == []
    assert cli.main(["generate", "--quiet"]) == 0 and ran == ["generate"]
    monkeypatch.setattr(sys, "argv", ["vllm-medusa", "calibrate-tree", "--heads", "x"])
    assert cli.main() == 0 and ran == ["generate", "calibrate"]
    assert len(seen) == 1
