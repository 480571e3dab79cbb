"""`benchmarks/induction.py`'s task positions, each component's firing share per task and the components of the
two mechanisms as the tasks define them, by hand."""

from __future__ import annotations

import torch
from induction import firing, per_layer, task_mechanisms, task_positions

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


def test_the_tasks_define_the_mechanisms_by_the_components_they_use() -> None:
    components = [["a"], ["b", "c"], ["d"], ["e"], ["f"]]
    firings = [
        {"fires_on_induction_task": 1.0, "fires_on_previous_token_task": 1.0},  # both tasks: previous-token head
        {"fires_on_induction_task": 0.5, "fires_on_previous_token_task": 0.1},  # the induction task alone
        {"fires_on_induction_task": 0.4, "fires_on_previous_token_task": 0.0},  # too rarely on either: the rest
        {"fires_on_induction_task": 0.9, "fires_on_previous_token_task": 0.49},  # just under half of the other's
        {"fires_on_induction_task": 0.0, "fires_on_previous_token_task": 0.5},  # the previous-token task alone
    ]
    assert task_mechanisms(components, firings) == {
        "previous_token_task_components": ["a", "f"],
        "induction_task_components": ["b", "c", "e"],
    }


def test_per_layer_counts_the_units_each_layer_holds() -> None:
    units = ["blocks.0.attn.q_proj/3", "blocks.1.attn.k_proj/0", "blocks.1.attn.o_proj/7"]
    assert per_layer(units, 3) == [1, 2, 0]
