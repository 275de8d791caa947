import pytest
import torch

from imgcls_core.engine.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointDir,
    Preprocessing,
    load_checkpoint,
    save_checkpoint,
)

PRE = Preprocessing(32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 1.0, ["a", "b"])


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((2,), value)}, "epoch": 1, "step": 10}


def test_save_and_load_with_weights_only(tmp_path):
    save_checkpoint(tmp_path / "c", _state(3.0), {"train": {"epochs": 2}}, PRE, {"val/acc1": 0.9})
    loaded = load_checkpoint(tmp_path / "c")
    assert torch.equal(loaded["model"]["w"], torch.full((2,), 3.0))
    assert loaded["preprocessing"]["classes"] == ["a", "b"]
    assert loaded["metrics"]["val/acc1"] == 0.9
    assert (tmp_path / "c" / "config.yaml").read_text().startswith("train:")
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c", _state(1.0), {}, PRE)
    file = tmp_path / "c" / CHECKPOINT_FILE
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable or not an imgcls checkpoint"):
        load_checkpoint(file)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_checkpoint_that_is_not_plain_data_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format_version": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_dir_keeps_the_newest(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ckpts", keep=2)
    for epoch in range(1, 5):
        src = save_checkpoint(tmp_path / f"tmp{epoch}", _state(float(epoch)), {}, PRE)
        ckpts.commit(src, epoch)
    assert [e for e, _ in ckpts.epochs()] == [3, 4]
    assert load_checkpoint(ckpts.latest())["model"]["w"][0] == 4.0
    (ckpts.path_for(5)).mkdir()  # an interrupted save: directory without the file
    assert ckpts.latest() == ckpts.path_for(4)
