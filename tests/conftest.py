import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _task_cache(tmp_path_factory):
    """Tests build Meta-World task lists into a cache of their own, never the user's."""
    os.environ.setdefault("ICL_METARL_CACHE", str(tmp_path_factory.mktemp("icl_metarl_cache")))
    yield
