"""Fixed-width text tables for the console, made one way: the header and every row through the same columns."""


class Columns:
    """Columns of fixed width, each (title, format spec of a string: "<28" pads on the right, ">10" on the left,
    for numbers), joined by one space; then at most one free column of any width (a status, a remark) after
    `gap`, whose title is `rest`."""

    def __init__(self, *columns: tuple, rest: str = "", gap: str = " "):
        self.titles = [title for title, _ in columns]
        self.specs = [spec for _, spec in columns]
        self.rest, self.gap = rest, gap

    def line(self, *cells) -> str:
        """One row: a cell for each column (already formatted as text), then optionally the free column's."""
        if len(cells) not in (len(self.specs), len(self.specs) + 1):
            raise ValueError(f"{len(cells)} cells for {len(self.specs)} columns (and one free column at most)")
        fixed, free = cells[:len(self.specs)], cells[len(self.specs):]
        return " ".join(format(cell, spec) for cell, spec in zip(fixed, self.specs, strict=True)) + \
            "".join(self.gap + cell for cell in free)

    def header(self) -> str:
        """The titles, aligned as the rows are."""
        return self.line(*self.titles, *([self.rest] if self.rest else []))


VERDICTS = Columns(("layout", "<10"), ("dtype", "<13"), ("verdict", "<15"), ("seconds", ">7"), rest="reason", gap="  ")


def verdicts(rows: list) -> str:
    """The self-test's rows (tritonrnn.selftest.run_all) as text, one line a layout and dtype."""
    return "\n".join([VERDICTS.header()] + [VERDICTS.line(r["layout"], r["dtype"], r["status"], f"{r['seconds']:.2f}",
                                                          r["reason"]) for r in rows])
