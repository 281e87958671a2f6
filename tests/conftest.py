"""Suite-wide test settings."""

import sys

import pytest

from pcd.pipeline.socket_folder import ensure_short_socket_folder


def pytest_configure(config):
    """A long TMPDIR would make the workers of pools and DataLoaders fail or hang (pcd's CLI does the same)."""
    ensure_short_socket_folder()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run torch on one intra-op thread: the tests' tiny models gain nothing from more, results stay
    deterministic, and on a shared 2-core machine oversubscribed threads were measured 10x slower.

    Session-scoped so that module-scoped fixtures (reference outputs) run on the same thread count as the tests
    comparing against them: float reductions, and so output bytes, depend on it."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The scenes the session's tiny export was pre-trained on: none of them is a scene any test evaluates on.
TINY_EXPORT_SCENES = {"scene0500_00": 6, "scene0501_00": 6}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory):
    """One tiny pre-trained `pcd export` folder per test session, for every test that fine-tunes from
    pre-trained weights (detection now; each downstream task's tests next). Share it, never change it (copy
    it first): it is built once, and every test that asks for it gets the same folder.

    It is made the way a user makes one, with the `tiny` presets of the real commands: training shards of
    the scenes in TINY_EXPORT_SCENES with the random tiny teacher's layout (tests/training_shards.py), then
    `pcd pretrain --preset tiny` for 2 steps, then `pcd export`. The folder holds backbone.safetensors,
    backbone.json (architecture of [pretrain.tiny], input normalisation, pre-training scenes = the keys of
    TINY_EXPORT_SCENES, teacher) and point_mae.pth. The fixture returns that folder's Path.
    """
    from pcd.pipeline.config import build_config
    from pcd.trainer import export, pretrain
    from training_shards import write_training_shards

    root = tmp_path_factory.mktemp("tiny_export")
    write_training_shards(root / "shards", TINY_EXPORT_SCENES, points=300)
    cfg = build_config(pretrain.Config, "pretrain", "tiny", [
        f"shards_dir={root / 'shards'}", f"run_dir={root / 'pretrain'}", "num_points=128", "optim.batch_size=4",
        "optim.epochs=1", "runtime.max_steps_per_epoch=2", "runtime.workers=0", "runtime.progress=false",
        "runtime.eval_every=0"])
    assert pretrain.run(cfg) == 0
    assert export.run(export.Config(run_dir=root / "pretrain", out_dir=root / "export")) == 0
    return root / "export"


@pytest.fixture(scope="session")
def experiment_data(tmp_path_factory: pytest.TempPathFactory):
    """The generated inputs of the experiments' `tiny` variants, made once per test session by the same function
    `pcd experiment run` calls (generated scenes, extraction, random tiny teacher with patch tokens, shapes).
    Tests pass the folder as the run's data folder, so the runner finds every generation step done; never change
    it."""
    from pcd.trainer.experiment import generate_inputs

    root = tmp_path_factory.mktemp("experiment_data")
    generate_inputs(root, ["teacher_shards", "scannet_train_split", "scannet_val_split", "modelnet40"])
    return root
