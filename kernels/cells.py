"""The cells the recurrence machinery runs: what a cell is to the launchers, the ops and the
dispatcher. A cell's name is the kernels' CELL constexpr (kernels/common.py, `activate`: its step
after the matmul); `gates` multiplies W_hh's rows (the matmul's N side: 4 H for an LSTM; the launchers
check W_hh's shape by it). The Elman cell comes in its two nonlinearities; a new cell adds its entry
here, its step in kernels/common.py and, where it carries more than h (an LSTM's c), its state.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    gates: int = 1


CELLS = {cell.name: cell for cell in (Cell("tanh"), Cell("relu"))}


def get(name: str) -> Cell:
    """The cell named `name`; ValueError naming the cells there are."""
    if name not in CELLS:
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {name!r}")
    return CELLS[name]
