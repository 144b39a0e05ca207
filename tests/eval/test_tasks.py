from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipft.config import ConfigError, ZeroShotTaskConfig, load_config
from clipft.data.table import DataError
from clipft.eval.tasks import TEMPLATE_SETS, build_zeroshot_task
from clipft.models import build_model


@pytest.fixture(scope="module")
def preprocess():
    return build_model(load_config(None, []).model).preprocess_val


def test_template_sets() -> None:
    assert TEMPLATE_SETS["single"] == ("a photo of a {}.",)
    assert len(TEMPLATE_SETS["openai_imagenet"]) == 80 and len(set(TEMPLATE_SETS["openai_imagenet"])) == 80
    assert all(t.count("{}") == 1 for t in TEMPLATE_SETS["openai_imagenet"])
    assert "a bad photo of a {}." in TEMPLATE_SETS["openai_imagenet"]
    assert len(TEMPLATE_SETS["simple_imagenet"]) == 7
    with pytest.raises(ConfigError, match="templates or template_set, not both"):
        load_config(None, ["eval.zeroshot=[{name: a, source: folder, data: d, templates: ['{}'], template_set: single}]"])


def test_image_folder_task(tmp_path: Path, preprocess) -> None:
    for label, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / "pets" / label / "sub").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), value + i, dtype=np.uint8)).save(tmp_path / "pets" / label / "sub" / f"{i}.jpg")
    (tmp_path / "pets" / "cats" / "notes.txt").write_text("not an image")
    task = build_zeroshot_task(
        ZeroShotTaskConfig(name="pets", source="folder", data=str(tmp_path / "pets"), template_set="openai_imagenet"),
        preprocess,
    )
    assert task.class_names == ["cats", "dogs"] and len(task.templates) == 80
    assert [task.dataset[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert task.dataset[0][0].shape == (3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build_zeroshot_task(ZeroShotTaskConfig(name="e", source="folder", data=str(tmp_path / "empty")), preprocess)
