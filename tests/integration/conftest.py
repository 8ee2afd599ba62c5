import pytest

from tests.conftest import distillery, recipe_copy


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory):
    """recipes/ci.yaml run once, every stage (generate → export), shared by the integration tests."""
    tmp = tmp_path_factory.mktemp("ci")
    recipe, runs = recipe_copy(tmp), tmp / "runs"
    proc = distillery("run", str(recipe), "--runs", str(runs))
    return recipe, runs, proc
