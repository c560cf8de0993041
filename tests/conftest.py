import contextlib
import io
import os
from types import SimpleNamespace

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` the N workers share the machine's cores: torch's (and every subprocess's) OpenMP pool
    # would otherwise start a thread per core in each worker, which then spin against each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _task_cache(tmp_path_factory):
    """Tests build Meta-World task lists into a cache of their own, never the user's."""
    os.environ.setdefault("ICL_METARL_CACHE", str(tmp_path_factory.mktemp("icl_metarl_cache")))
    yield


def run_cli(*args) -> SimpleNamespace:
    """``icl-metarl ARGS`` in this process (a subprocess would spend most of its time importing torch and
    Meta-World again): returncode, stdout and stderr as subprocess.run gives them. The entry point itself
    is run as a subprocess by test_registry's help checks."""
    from icl_metarl.study.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, or an option it rejects
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
