import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (runs a script end to "
                                       "end, often several times); deselect with -m 'not slow' "
                                       "for the quick tier")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tokenizer + padded-vocabulary teacher + student + toy train/test jsonl, built once."""
    from examples.tiny_setup import build

    return build(tmp_path_factory.mktemp("tiny"))


def run_script(*args, check=True):
    """Run a repo script as a user would; returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
