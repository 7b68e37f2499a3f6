"""The cells the recurrence machinery runs: what a cell is to the launchers, the ops and the
dispatcher. A cell's name is the kernels' CELL constexpr (kernels/common.py, `activate`: its step
after the matmul); `gates` multiplies W_hh's rows (the matmul's N side: 4 H for an LSTM), `states`
counts the tensors carried from step to step (h; an LSTM adds c). The Elman cell comes in its two
nonlinearities; a new cell adds its entry here and its step in kernels/common.py.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    gates: int = 1
    states: int = 1


CELLS = {cell.name: cell for cell in (Cell("tanh"), Cell("relu"))}


def get(name: str) -> Cell:
    """The cell named `name`; ValueError naming the cells there are."""
    if name not in CELLS:
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {name!r}")
    return CELLS[name]
