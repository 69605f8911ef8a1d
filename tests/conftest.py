import os
from pathlib import Path

import pytest

# Nothing in the suite may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from selfalign_ray.models.tiny import tiny_random_path

    return str(tiny_random_path())


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray cluster for one test module (the size of the CI box)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def persona_file(tmp_path: Path) -> Path:
    """Eight well-formed personas (a small local file, as a user would pass with personas.path=)."""
    import json

    from persona_texts import PERSONAS as texts
    path = tmp_path / "personas.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "persona": t}) + "\n" for i, t in enumerate(texts)))
    return path
