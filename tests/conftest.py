import os

import pytest

# No model hub is reachable from our machines; every test loads only what it builds itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (minutes of CPU: full pocket training runs) run only with FLOWALIGN_SLOW=1."""
    if os.environ.get("FLOWALIGN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; run with FLOWALIGN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models gain nothing from threads, and on a shared CPU
    they lose a lot to them (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A seeded 1-layer CLIPModel folder with the pocket tokenizer and image processor (exemplar-set tests)."""
    import torch
    from transformers import CLIPModel

    from flowalign.pocket import models as pm

    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    tok = pm.build_tokenizer()
    CLIPModel(pm.clip_config(tok, width=32, layers=1, vision_width=32, vision_layers=1)).save_pretrained(path)
    tok.save_pretrained(path)
    pm.image_processor().save_pretrained(path)
    return str(path)
