"""Hidden-state losses: which student layer learns from which teacher layer, the learned projections
that bridge different widths, and the masked MSE / cosine loss between mapped layers.

Layer indices are 0-based: layer i's output is Hugging Face's ``hidden_states[i + 1]``
(``hidden_states[0]`` is the embedding output).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from distill.objective.losses import HIDDEN_LOSS_KINDS, _math_dtype


def _check_layer_counts(num_student_layers: int, num_teacher_layers: int) -> None:
    for name, value in (("student", num_student_layers), ("teacher", num_teacher_layers)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"number of {name} layers must be an integer >= 1, got {value!r}")


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i <-> teacher layer round((i + 1) * Lt / Ls) - 1, 0-based; last <-> last.

    Rounds half up (floor(x + 0.5)), computed exactly in integers, not Python's banker's round:
    (24, 28) maps student 8 to teacher 10 (10.5 -> 11), where round() would give 9. A student deeper
    than its teacher maps its first layers to teacher layer 0.
    """
    _check_layer_counts(num_student_layers, num_teacher_layers)
    ls, lt = int(num_student_layers), int(num_teacher_layers)
    # floor((i + 1) * lt / ls + 1/2) == floor((2 * (i + 1) * lt + ls) / (2 * ls))
    return [(i, max((2 * (i + 1) * lt + ls) // (2 * ls) - 1, 0)) for i in range(ls)]


def resolve_layer_map(
    spec: str | Sequence[Sequence[int]], num_student_layers: int, num_teacher_layers: int
) -> list[tuple[int, int]]:
    """``"uniform"`` or explicit ``[[student_layer, teacher_layer], ...]`` pairs (0-based)."""
    _check_layer_counts(num_student_layers, num_teacher_layers)
    if isinstance(spec, str):
        if spec == "uniform":
            return uniform_layer_map(num_student_layers, num_teacher_layers)
        raise ValueError(
            f"objective.hidden.layer_map {spec!r} is not known; use 'uniform' or a list of "
            "[student_layer, teacher_layer] pairs (0-based)"
        )
    ranges = (
        f"valid student layers are 0..{num_student_layers - 1} and teacher layers "
        f"0..{num_teacher_layers - 1} (0-based: layer i is hidden_states[i + 1])"
    )
    pairs = []
    for pair in spec:
        is_pair = isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2
        if not is_pair or not all(
            isinstance(x, Integral) and not isinstance(x, bool) for x in pair
        ):
            raise ValueError(
                f"objective.hidden.layer_map entry {pair!r} is not a [student_layer, teacher_layer] "
                f"pair of integers; {ranges}"
            )
        student_layer, teacher_layer = int(pair[0]), int(pair[1])
        if not (
            0 <= student_layer < num_student_layers and 0 <= teacher_layer < num_teacher_layers
        ):
            raise ValueError(
                f"objective.hidden.layer_map pair [{student_layer}, {teacher_layer}] is out of "
                f"range: {ranges}; fix the pair or use 'uniform'"
            )
        pairs.append((student_layer, teacher_layer))
    if not pairs:
        raise ValueError(
            "objective.hidden.layer_map is empty; give at least one [student_layer, teacher_layer] "
            "pair, use 'uniform', or disable the hidden-state loss"
        )
    return pairs


class HiddenProjections(nn.Module):
    """Learned ``nn.Linear(student_width, teacher_width)`` per mapped pair; identity if widths match.

    These are trainable parameters: the optimizer and checkpoints must include them.
    """

    def __init__(
        self,
        layer_map: Sequence[tuple[int, int]],
        student_width: int,
        teacher_width: int,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.layer_map = [(int(s), int(t)) for s, t in layer_map]
        self.student_width = int(student_width)
        self.teacher_width = int(teacher_width)
        if self.student_width != self.teacher_width and not enabled:
            raise ValueError(
                f"student hidden width {self.student_width} differs from teacher width "
                f"{self.teacher_width}, so hidden states cannot be compared directly; set "
                "`objective.hidden.projection: true` to learn a linear projection per layer pair"
            )
        widths_differ = self.student_width != self.teacher_width
        self.projections = (
            nn.ModuleList(nn.Linear(self.student_width, self.teacher_width) for _ in self.layer_map)
            if widths_differ
            else nn.ModuleList()
        )

    def forward(self, student_state: torch.Tensor, pair_index: int) -> torch.Tensor:
        """Map a student state [..., Hs] of pair ``pair_index`` to the teacher's width."""
        if len(self.projections) == 0:
            return student_state
        projection = self.projections[pair_index]
        return projection(student_state.to(projection.weight.dtype))


def hidden_state_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    layer_map: Sequence[tuple[int, int]],
    projections: HiddenProjections,
    kind: str,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, num_valid_tokens) of a hidden-state loss over mapped layer pairs.

    ``student_states[i]`` / ``teacher_states[j]`` are layer outputs [B, S, H] by 0-based layer index
    (``outputs.hidden_states[1:]``); ``mask`` [B, S] is True on tokens to match. Per token and pair:
    ``"mse"`` is the mean over the teacher's hidden dim of (project(s) - t)**2, ``"cosine"`` is
    1 - cos(project(s), t). The sum runs over valid tokens AND pairs (so it grows with the number of
    pairs); the count is of tokens only. Math in float32 (float64 for float64 states); the teacher
    states get no gradient.
    """
    if kind not in HIDDEN_LOSS_KINDS:
        raise ValueError(
            f"unknown hidden loss kind {kind!r}; use one of {', '.join(HIDDEN_LOSS_KINDS)}"
        )
    layer_map = [(int(s), int(t)) for s, t in layer_map]
    if not layer_map:
        raise ValueError("layer_map is empty; build it with resolve_layer_map")
    if projections.projections and layer_map != projections.layer_map:
        raise ValueError(
            "layer_map differs from the one the HiddenProjections were built with; build them "
            "from the same resolved layer map"
        )
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, S], got {list(mask.shape)}")
    mask = mask if mask.dtype == torch.bool else mask != 0
    for student_layer, teacher_layer in layer_map:
        if not (
            0 <= student_layer < len(student_states) and 0 <= teacher_layer < len(teacher_states)
        ):
            raise ValueError(
                f"layer pair [{student_layer}, {teacher_layer}] is out of range for "
                f"{len(student_states)} student and {len(teacher_states)} teacher layer outputs; "
                "pass hidden_states[1:] of each model and a layer map from resolve_layer_map"
            )
    total = None
    for pair_index, (student_layer, teacher_layer) in enumerate(layer_map):
        student = student_states[student_layer]
        teacher = teacher_states[teacher_layer]
        if student.shape[:-1] != mask.shape or teacher.shape[:-1] != mask.shape:
            raise ValueError(
                f"layer pair [{student_layer}, {teacher_layer}]: states {list(student.shape)} and "
                f"{list(teacher.shape)} must be [B, S, H] with [B, S] = {list(mask.shape)} (mask)"
            )
        dtype = _math_dtype(student)
        projected = projections(student[mask], pair_index).to(dtype)
        target = teacher[mask].detach().to(dtype)
        if projected.shape[-1] != target.shape[-1]:
            raise ValueError(
                f"layer pair [{student_layer}, {teacher_layer}]: projected student width "
                f"{projected.shape[-1]} != teacher width {target.shape[-1]}; build "
                "HiddenProjections with the teacher's hidden size"
            )
        if kind == "mse":
            per_token = (projected - target).square().mean(-1)
        else:
            per_token = 1.0 - F.cosine_similarity(projected, target, dim=-1)
        total = per_token.sum() if total is None else total + per_token.sum()
    return total, mask.sum().to(torch.int64)
