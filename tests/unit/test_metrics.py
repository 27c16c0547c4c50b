"""Metric labels stay a small fixed set per environment, never the task id itself."""

from spo3.transport.metrics import task_type


def test_task_type_labels():
    assert (
        task_type("textworld", "/runs/x/games/tw-coin_collector-4c8972dc-s20.z8")
        == "tw-coin_collector"
    )
    assert task_type("textworld", "games/tw-cooking-0a1b2c3d-s7.z8") == "tw-cooking"
    assert task_type("textworld", "/home/me/my_own_game.z8") == "custom"
    assert task_type("twx", "coin:seed=3:fold=test") == "coin"
    assert task_type("scienceworld", "boil:0") == "boil"
    assert (
        task_type("alfworld", "data/pick_and_place_simple-Apple-None-Fridge-901/trial_T1")
        == "pick_and_place_simple"
    )
    assert (
        task_type(
            "alfworld", "data/look_at_obj_in_light-Book-None-DeskLamp-903/trial_T3/game.tw-pddl"
        )
        == "look_at_obj_in_light"
    )
    assert task_type("alfworld", "/somewhere/else") == "other"
    assert task_type("twx", "Not A Name!:seed=1") == "other"
    assert task_type("webshop", "42") == "other"
