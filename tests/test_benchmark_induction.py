"""`benchmarks/induction.py`'s task positions, each component's firing share per task and the components of the
induction task alone, by hand."""

from __future__ import annotations

import torch
from induction import firing, induction_task_components, task_positions

D_VOCAB = 8  # BOS is 8, the second task's BOS' is 9


def test_task_positions_split_the_two_tasks_and_skip_their_first_positions() -> None:
    ids = torch.tensor([[8, 1, 2, 1, 2], [9, 5, 6, 7, 4]])
    tasks = task_positions(ids, D_VOCAB)
    assert tasks["induction_task"].tolist() == [[False, True, True, True, True], [False] * 5]
    assert tasks["previous_token_task"].tolist() == [[False] * 5, [False, False, True, True, True]]


def test_task_positions_are_empty_without_the_second_task() -> None:
    assert task_positions(torch.tensor([[8, 1, 2, 1, 2]]), D_VOCAB) == {}


def test_a_component_fires_where_any_member_is_active() -> None:
    tasks = {"a": torch.tensor([[True, True, False, False]]), "b": torch.tensor([[False, False, True, True]])}
    active = torch.zeros(1, 4, 3, dtype=torch.bool)
    active[0, 0, 0] = active[0, 1, 1] = active[0, 2, 2] = True  # unit 2 fires once on task b
    assert firing(active, tasks, [0, 1]) == {"fires_on_a": 1.0, "fires_on_b": 0.0}
    assert firing(active, tasks, [0, 2]) == {"fires_on_a": 0.5, "fires_on_b": 0.5}


def test_the_induction_task_components_fire_on_half_its_positions_and_a_tenth_of_the_others_at_most() -> None:
    components = [["a"], ["b", "c"], ["d"], ["e"]]
    firings = [
        {"fires_on_induction_task": 1.0, "fires_on_previous_token_task": 1.0},  # both tasks: previous-token head
        {"fires_on_induction_task": 0.5, "fires_on_previous_token_task": 0.1},
        {"fires_on_induction_task": 0.4, "fires_on_previous_token_task": 0.0},  # too rarely on the induction task
        {"fires_on_induction_task": 0.9, "fires_on_previous_token_task": 0.2},  # too often on the other
    ]
    assert induction_task_components(components, firings) == ["b", "c"]
