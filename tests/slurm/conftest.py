import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import Cluster, available


@pytest.fixture(scope="session")
def cluster():
    why = available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {why}")
        pytest.skip(why)
    c = Cluster(Path(tempfile.mkdtemp(prefix="rds-slurm-"))).start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.d, ignore_errors=True)  # holds a munge key: never left behind
