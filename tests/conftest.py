import os

# No model hub is reachable from our machines; every test loads only what it builds itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (minutes of CPU: full pocket training runs) run only with FLOWALIGN_SLOW=1."""
    if os.environ.get("FLOWALIGN_SLOW") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="slow; run with FLOWALIGN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
