"""The standard grid's offline plan as the markdown table of perf/NOTES.md (v0.5 onwards).

The model itself is tritonrnn/costmodel.py (the dispatcher runs it); v0.4's standalone model of the
persistent path, which this file held, is superseded by it (perf/NOTES.md v0.4 keeps its table).

    python -m tritonrnn.perf.model [h100|h200]
"""
import sys

from . import plan


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rows = plan.grid_plan(argv[0] if argv else "h100")
    print(plan.markdown_table(rows))
    head = plan.headline(rows)
    print(f"\n{plan.headline_text(head)}")
    for dtype, hidden, batch, direction, algorithm, speedup in head["losing"]:
        print(f"- {dtype} H={hidden} B={batch} {direction}: {speedup:.2f}x against {algorithm}")


if __name__ == "__main__":
    main()
