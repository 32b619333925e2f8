"""A workdir stored before a config field existed resumes when the new config keeps the value
that run was trained with, and is refused when it changes it."""

import json

import pytest

from configs import demo
from moe_lvlm.train.resume import ResumeError, check_resume


def test_config_without_drop_policy_resumes_with_position(tmp_path):
    stored = demo.get_config().to_dict()
    del stored["model"]["moe"]["drop_policy"]  # a workdir from before the field existed
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert check_resume(tmp_path, demo.get_config()) == []
    changed = demo.get_config()
    changed.model.moe.drop_policy = "random"
    with pytest.raises(ResumeError, match="model.moe.drop_policy: 'position' -> 'random'"):
        check_resume(tmp_path, changed)
